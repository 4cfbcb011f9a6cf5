"""The Training service's server side: fine-tune LoRA adapters on the resident base model.

`spec` checks a job request and tokenizes its data; `jobs` is the job table (persisted);
`run` is one job's compute on the engine's thread (trainable LoRA beside the served layers,
time-sliced with serving); `worker` is the engine's side of the queue; `manager` is what the
front ends call (create, get, list, cancel, watch) and what registers a finished adapter.
"""
