"""The engine: scheduler, paged KV cache, runner, sampler and the step loop."""
