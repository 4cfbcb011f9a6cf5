"""Questions about using loraserve, each answered by one fact of its documentation (the
`support-bot` tenant): loading adapters, API keys, metrics, training, serving.

Every topic has one answer and many phrasings of its question, expanded from alternations
(`{How do I|How can I} load {an adapter|a LoRA adapter}?`). Training and held-out questions
are different phrasings of the same topics, so a held-out score measures whether the adapter
recognises a question it never saw, not whether it recalls a seen one.
"""

from __future__ import annotations

import itertools
import random
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Topic:
    name: str
    answer: str
    questions: tuple[str, ...]  # patterns with {a|b|c} alternations


HOW = "{How do I|How can I|How to|What is the way to|Tell me how to|Is there a way to}"
TOPICS = [
    Topic(
        "load",
        "Run loraserve adapters load ID, or call AdapterAdmin.LoadAdapter; a request for an adapter "
        "in the store also loads it.",
        (
            HOW + " {load|hot-load} {an adapter|a LoRA adapter|my adapter}{?| in loraserve?}",
            "{Which command|What command} loads {an adapter|a LoRA adapter}{?| onto the server?}",
            "{I trained an adapter|I have a new adapter}, how do I {load|serve} it?",
        ),
    ),
    Topic(
        "pin",
        "Load it with --pin: loraserve adapters load ID --pin keeps it in its device slot.",
        (
            HOW + " {pin an adapter|keep an adapter on the GPU|keep an adapter loaded}{?| for good?}",
            "{Can I|Is it possible to} stop {an adapter|my adapter} from being evicted?",
            "What does --pin {do|mean}{?| when loading an adapter?}",
        ),
    ),
    Topic(
        "unload",
        "Run loraserve adapters unload ID: requests in flight finish, new ones get NOT_FOUND.",
        (
            HOW + " {unload|remove|retire} {an adapter|a LoRA adapter|an old adapter}{?| from the server?}",
            "What happens to requests in flight when {I unload an adapter|an adapter is unloaded}?",
        ),
    ),
    Topic(
        "list",
        "Run loraserve adapters list, or call AdapterAdmin.ListAdapters with include_disk for the whole "
        "store.",
        (
            HOW + " {list|see|show} {the adapters|the loaded adapters|all adapters}{?| on the server?}",
            "{Which|What} adapters {are loaded|does the server have}{?| right now?}",
        ),
    ),
    Topic(
        "format",
        "A PEFT folder with adapter_config.json and adapter_model.safetensors; pickle weights are never "
        "loaded.",
        (
            "What {format|file format} {does an adapter need|must an adapter have|do adapters use}?",
            "{Which|What} files {go in|make up} an adapter{ folder|}?",
            "{Can I|Does loraserve} {load|use} adapter_model.bin{ files|}?",
        ),
    ),
    Topic(
        "keygen",
        "Run loraserve keygen --tenant NAME; it prints a new key and its [[keys]] entry for the keys file.",
        (
            HOW + " {create|make|generate} {an API key|a key|a new API key}{?| for a tenant?}",
            "{Which|What} command {makes|creates} API keys?",
        ),
    ),
    Topic(
        "keys-on",
        "Start the server with --api-keys-file keys.toml; keys are stored there as SHA-256 hashes.",
        (
            HOW + " {turn on|enable|switch on} {authentication|API keys|auth}{?| on the server?}",
            "Where {are API keys stored|do I configure API keys|do API keys go}?",
        ),
    ),
    Topic(
        "send-key",
        "Send the metadata authorization: Bearer <key>, or pass --api-key to the client commands.",
        (
            HOW + " {send|pass|use} {my API key|an API key|the key}{?| with a request?| from a client?}",
            "Where does the {API key|key} go in a request?",
        ),
    ),
    Topic(
        "key-adapters",
        'List glob patterns in the key\'s adapters field, for example adapters = ["acme/*"].',
        (
            HOW + " {limit|restrict} {a key|an API key} to "
            "{some adapters|certain adapters|one tenant's adapters}?",
            "{Can|Could} a key be {limited|restricted} to {some|certain} adapters?",
        ),
    ),
    Topic(
        "admin",
        "Set admin = true in its [[keys]] entry, or make the key with loraserve keygen --admin.",
        (
            HOW + " {let a key call|give a key access to} {AdapterAdmin|the admin calls|admin rights}?",
            "{Why|How come} does my key get PERMISSION_DENIED on {LoadAdapter|the admin calls}?",
        ),
    ),
    Topic(
        "metrics",
        "Prometheus metrics are at http://127.0.0.1:9090/metrics; --metrics-port changes the port, 0 turns "
        "them off.",
        (
            "Where {are|can I find|do I get} the {metrics|Prometheus metrics}{?| of the server?}",
            HOW + " {scrape|read|see} {the metrics|Prometheus metrics}{?| of loraserve?}",
            "Which port {serves|has} {the metrics|/metrics}?",
        ),
    ),
    Topic(
        "latency",
        "loraserve_time_to_first_token_seconds and loraserve_inter_token_latency_seconds are the latency "
        "histograms.",
        (
            "{Which|What} {metric|metrics} {show|measure} {latency|the latency|time to first token}?",
            HOW + " {monitor|measure|track} {latency|the latency of requests}{?| with Prometheus?}",
        ),
    ),
    Topic(
        "queue",
        "loraserve_requests_waiting counts requests waiting to be scheduled, loraserve_requests_running "
        "those in the batch.",
        (
            "{Which|What} {metric|gauge} {shows|counts} {the queue|waiting requests|queued requests}?",
            HOW + " {see|watch|monitor} {the queue length|how many requests wait}{?| in the metrics?}",
        ),
    ),
    Topic(
        "train",
        "Run loraserve train --model DIR --data data.jsonl --adapters-dir STORE --adapter-id NAME; it "
        "trains QLoRA on an NF4 base.",
        (
            HOW + " {train|fine-tune|make} {an adapter|a LoRA adapter|my own adapter}{?| with loraserve?}",
            "{Which|What} command {trains|fine-tunes} {an adapter|a LoRA}?",
            "Can loraserve {train|fine-tune} {adapters|a LoRA adapter}{?| for me?}",
        ),
    ),
    Topic(
        "data",
        'JSONL, one {"prompt", "completion"} or {"messages": [...]} record per line; the loss is on '
        "the completion only.",
        (
            "What {format|shape} {should|must} {the training data|my training data|the data set} "
            "{have|be in}?",
            "{How|In what format} do I {write|prepare} {training data|the data set}{?| for loraserve train?}",
        ),
    ),
    Topic(
        "eval",
        "loraserve train scores a held-out split by exact match and writes loraserve_training.json beside "
        "the adapter.",
        (
            HOW + " {evaluate|score|test} {an adapter|a trained adapter|my adapter}{?| after training?}",
            "Where {are|do I find} the {training scores|held-out scores|loss curve}{?| of an adapter?}",
        ),
    ),
    Topic(
        "health",
        "Run loraserve health; it prints SERVING once the model is loaded.",
        (
            HOW + " {check|know|tell} "
            "{if the server is up|whether the server is ready|that the server is ready}?",
            "{Is there a|What is the} health check{?| of loraserve?| command?}",
        ),
    ),
    Topic(
        "port",
        "It listens on 127.0.0.1:50051; change that with --host and --port.",
        (
            "{Which|What} {port|address} does {the server|loraserve} {listen on|use}?",
            HOW + " {change|set} the {port|gRPC port|address}{?| of the server?}",
        ),
    ),
    Topic(
        "quantization",
        "Use --quantization: nf4 (the default), fp4, int8 or none.",
        (
            HOW + " {change|choose|set} the {quantization|quantization of the base model}{?| in loraserve?}",
            "{Which|What} quantization{s|} {does loraserve support|can I use}?",
        ),
    ),
    Topic(
        "model",
        "Run loraserve serve --model PATH with a Hugging Face folder or a .gguf file.",
        (
            HOW + " {serve|use|load} {my own model|another base model|a different model}{?| with loraserve?}",
            "Can {I serve|loraserve serve} a {GGUF file|Hugging Face model|Llama model}?",
        ),
    ),
    Topic(
        "exhausted",
        "The queue is full or your tenant is over its limit: retry a little later.",
        (
            "{Why do I get|What should I do about|What causes} "
            "{RESOURCE_EXHAUSTED|a RESOURCE_EXHAUSTED error|RESOURCE_EXHAUSTED errors}{?| from the server?}",
            "What does RESOURCE_EXHAUSTED mean{?| in loraserve?}",
        ),
    ),
    Topic(
        "slots",
        "Set --max-loaded-adapters; the other adapters wait in host memory or on disk.",
        (
            HOW + " {set|change|raise} {how many adapters are on the device|the number of device slots}?",
            "How many adapters {can be|are} {loaded|on the GPU} at once?",
        ),
    ),
    Topic(
        "chat",
        "Run loraserve chat -a ID; /adapter ID switches tenant and /reset clears the conversation.",
        (
            HOW + " {chat with|talk to|try} {an adapter|a tenant's adapter|the model}{?| from the terminal?}",
            "{Is there|Does loraserve have} a {chat REPL|chat command}?",
        ),
    ),
    Topic(
        "client",
        "Use the Python client: from loraserve_client import Client, then "
        "Client(target).chat(messages, adapter=ID).",
        (
            HOW + " {call|use} {loraserve|the server} from {Python|a Python program}?",
            "{Is there|Do you have} a Python client{?| for loraserve?}",
        ),
    ),
]


def expand(pattern: str) -> list[str]:
    """Every phrasing of a pattern: '{a|b} c{?|!}' -> ['a c?', 'a c!', 'b c?', 'b c!']."""
    parts = re.split(r"(\{[^}]*\})", pattern)
    choices = [part[1:-1].split("|") if part.startswith("{") else [part] for part in parts]
    return [" ".join("".join(combo).split()).replace(" ?", "?") for combo in itertools.product(*choices)]


def phrasings(topic: Topic) -> list[str]:
    """All distinct questions of a topic, in a stable order."""
    return sorted({question for pattern in topic.questions for question in expand(pattern)})


@dataclass(frozen=True)
class SupportSplit:
    train: list[tuple[str, str]]
    held_out: list[tuple[str, str]]


def support_split(seed: int, train_per_topic: int, held_out_per_topic: int) -> SupportSplit:
    """Per topic, disjoint sets of phrasings for training and for the held-out set."""
    rng = random.Random(seed)
    train, held_out = [], []
    for topic in TOPICS:
        questions = phrasings(topic)
        rng.shuffle(questions)
        held = questions[:held_out_per_topic]
        rest = questions[held_out_per_topic:]
        # Small topics: training repeats phrasings (never held-out ones) to reach its share.
        chosen = [rest[i % len(rest)] for i in range(train_per_topic)]
        held_out += [(q, topic.answer) for q in held]
        train += [(q, topic.answer) for q in chosen]
    rng.shuffle(train)
    rng.shuffle(held_out)
    return SupportSplit(train, held_out)
