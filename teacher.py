"""Reasoning traces from a teacher model, for the paper's SFT-Rea-4o source (rollout_sft.py --source rea_external).

The paper trains SFT-Rea-4o on reasoning written by GPT-4o. This module asks any server that speaks the
OpenAI chat-completions API (POST {url}/chat/completions: OpenAI itself with gpt-4o, or a local vLLM / SGLang
serving a large Qwen2.5-VL) to write, for each puzzle, the reasoning that leads to its true answer. The teacher
sees the puzzle image(s), the student's own question and the true answer; the reply must end in that answer
(parsed with jigsaw.extract_answer: regex only, never eval), else the trace is dropped and counted.

    python rollout_sft.py --source rea_external --data runs/3b/data/jigsaw --output_dir runs/3b/data/sources/rea_4o \\
        --teacher_url https://api.openai.com/v1 --teacher_model gpt-4o        # key in $OPENAI_API_KEY
    python rollout_sft.py --source rea_external --data runs/3b/data/jigsaw --output_dir runs/3b/data/sources/rea_4o \\
        --teacher_url http://localhost:8000/v1 --teacher_model Qwen/Qwen2.5-VL-72B-Instruct \\
        --teacher_prompt_price 0 --teacher_completion_price 0                 # a local server, no key needed

Worked example (2x2 puzzle, true answer 3 1 / 4 2):
    reply "<think>The top-left piece shows sky ...</think><answer>3 1\\n4 2</answer>"  -> ok, reasoning kept
    reply content "<answer>3 1\\n4 2</answer>", reasoning_content "The top-left ..."  -> ok (joined, see below)
    reply "<think>...</think><answer>3 1\\n2 4</answer>"                          -> wrong_answer, dropped
    reply "The answer is 3 1 4 2."                                               -> no_answer, dropped
    HTTP 429 (Retry-After: 2) -> wait 2 s, ask again; HTTP 500 / timeout / dropped connection -> back off, ask
    again; after --teacher_max_retries failed retries the puzzle is given up for this run (not written), and
    the next run of the same command asks for it again.

Reasoning in a separate field: servers that parse a model's <think> block out of its reply return it in
message.reasoning_content and only the rest in message.content: transformers serve (Qwen models: its response
template in transformers/cli/serving/utils.py, field set in chat_completion.py), the DeepSeek API, and vLLM with
a --reasoning-parser, which renamed the field to message.reasoning (docs.vllm.ai, features/reasoning_outputs:
"reasoning used to be called reasoning_content"). The first non-empty one is read and the trace judged is
"<think>" + reasoning + "</think>" + content. Both raw fields are stored in the shard, so a rerun rebuilds every
record from them. Shards written before this (only content stored; a reply whose reasoning came in the separate
field was judged "no reasoning") cannot be rebuilt: those no-reasoning records are asked again, with a message.

A teacher that cannot work stops the run early, with the setting to fix: the first EARLY_STOP_FAILURES requests
all failing (connection refused: --teacher_url; no reply in time: the server or --teacher_timeout_s; HTTP 500 or
an error naming the model: --teacher_model), or, once replies have come, STALL_S seconds of failures without a
reply. Without this, a wrong port was retried for minutes per puzzle and hours per run before a word was said.

Timeouts: --teacher_timeout_s bounds each request from its send to the end of its reply (not per byte, and not
the time a request waits in the client for a free slot). A server that answers fewer requests at once than
--teacher_concurrency (transformers serve answers one at a time) queues the rest, and their wait counts: when a
request times out while the server was answering others, the client halves the requests it keeps in flight, so
the queue moves into the client, where it is not timed.

Resume: every answered puzzle (ok or dropped) is appended to OUT.teacher.jsonl as soon as its reply arrives, by
the thread that received it, with write + fsync. Ctrl-C cancels the requests in flight at once (their sockets
are shut down; a paid API may still bill a reply it was generating) and keeps every reply that had arrived. A
rerun reads the shard (a torn last line is dropped), skips the puzzles in it and asks only for the rest; the data
set is built from the shard in data order, so it is the same whatever the order replies came back in.
OUT.teacher.json holds the settings that change what the teacher writes (model, prompt, token cap, data): a
resume with other values is refused rather than mixing two teachers in one data set.

The API key is read from the environment variable named by --teacher_api_key_env (never from a flag, so it is
not in the shell history or in any recorded command line), sent only in the Authorization header, and removed
from every message this module prints or writes (a server may echo a request back in an error body).
Redirects are refused, so the header never goes to a host the user did not name. Replies are untrusted text:
they are parsed with json and plain string / regex code, never evaluated.
"""
from __future__ import annotations

import base64
import email.utils
import hashlib
import http.client
import io
import json
import os
import random
import socket
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

import common
import files
import jigsaw

# ----------------------------------------------------------------------------------------------------------
# Defaults, each with where it comes from
# ----------------------------------------------------------------------------------------------------------
# Prices for the cost estimate: rollout_sft.py's --teacher_prompt_price / --teacher_completion_price, whose
# defaults are GPT-4o's public list price in USD per 1M tokens (openai.com/api/pricing: gpt-4o, i.e. the
# gpt-4o-2024-08-06 snapshot, $2.50 input and $10.00 output; the first snapshot gpt-4o-2024-05-13 was $5 / $15).
# Prices change: check the page. Image tokens are billed as input and are included in the reply's
# usage.prompt_tokens, so the estimate covers them.
# Exponential backoff with jitter, as OpenAI's rate-limit guide recommends: wait BASE * 2^attempt, capped at
# MAX, times a random factor in [0.75, 1] so that many workers hit by the same 429 do not retry in lockstep.
BACKOFF_BASE_S = 1.0
BACKOFF_MAX_S = 60.0
# A Retry-After longer than this is treated as this (a broken proxy saying "retry in a day" should not hang a
# run; the puzzle is retried later or given up and redone on the next run).
RETRY_AFTER_MAX_S = 300.0
# Statuses worth retrying, as in the openai-python client: request timeout, conflict (lock), rate limit, and
# every server error. 401/403/404 mean a wrong key, model or URL: they stop the run (every puzzle would fail).
# Any other 4xx (400 bad request, 413 too large, 422 ...) is this puzzle's problem: counted, not written, so
# the next run asks again.
RETRY_STATUSES = {408, 409, 429}
FATAL_STATUSES = {401, 403, 404}
# Early stop. Before the first reply of a run, this many failed requests in a row (any puzzles, any workers) stop
# it: a wrong URL, model or server fails every request, and nothing is lost by stopping (rerun to resume). 429s
# are not counted (the server is alive and asks to slow down).
EARLY_STOP_FAILURES = 3
# Once replies have come: stop after this long with only failures (and at least EARLY_STOP_FAILURES of them).
# Long enough to ride out a server restart (vLLM loading a 72B model takes minutes), short against the hours a
# dead server would otherwise cost (every puzzle retried with backoff up to 60 s).
STALL_S = 600.0
# Seconds allowed to GET {url}/models, asked only to name the served models in an error message.
MODELS_TIMEOUT_S = 10.0

# ----------------------------------------------------------------------------------------------------------
# The teacher's prompt (what GPT-4o reads). Changing any sentence changes the data set: the prompt's hash is
# part of the shard's settings, so a resume with another prompt is refused.
# ----------------------------------------------------------------------------------------------------------
SYSTEM_PROMPT = " ".join([
    # Says what the text is for, so the model writes a worked solution rather than a chat reply to a person.
    "You write worked solutions for a data set of visual jigsaw puzzles; each solution is used to teach a "
    "smaller vision-language model how to solve such puzzles.",
    # The model is told the answer (so the trace is correct, as the paper's traces keep only correct answers)
    # but must not lean on it in the text: a student trained on "as given, the answer is ..." learns nothing
    # about looking at the image.
    "You are given the correct answer, but write the reasoning as a solver who looks only at the image: never "
    "mention that the answer was given to you.",
    # Grounds the reasoning in what a solver can see (the content of each piece and how edges continue), the
    # evidence the task is about, instead of a restatement of the grid.
    "Describe what the pieces show and use the visual evidence (shapes, colours, lines and objects that "
    "continue across the edges between pieces) to decide where each piece belongs.",
    # The format the student is trained on (R_fmt of the paper): the kit rewrites the answer block from the
    # ground truth, but a reply without these tags cannot be checked and is dropped.
    "Write the reasoning inside <think> </think> tags, then the final grid inside <answer> </answer> tags, one "
    "row per line, numbers separated by spaces, with nothing after </answer>.",
])

USER_TEMPLATE = (
    # The student's own question, word for word: the teacher answers the same question in the same numbering
    # convention (position_to_index or its inverse) that the data set's answers use.
    "{question}\n\n"
    # The true answer, in the exact layout the answer block must have.
    "The correct answer is:\n{answer_grid}\n\n"
    # Repeats the two rules replies most often break (copying the answer without reasoning, or saying it was
    # given), right before the model starts writing.
    "Write the step-by-step reasoning that leads to this answer from the image, then the answer, in the "
    "<think> </think><answer> </answer> format."
)


def prompt_sha256() -> str:
    """Hash of the prompt templates (part of the shard's settings)."""
    return hashlib.sha256((SYSTEM_PROMPT + "\0" + USER_TEMPLATE).encode()).hexdigest()[:16]


def log(message: str) -> None:
    print(f"[teacher] {message}", flush=True)


# ----------------------------------------------------------------------------------------------------------
# Configuration (from rollout_sft.py's --teacher_* flags)
# ----------------------------------------------------------------------------------------------------------
@dataclass
class TeacherConfig:
    """Built by config_from_args; each default is documented at its flag in rollout_sft.py."""
    url: str                # base URL; {url}/chat/completions is posted to
    model: str              # the server's model name (gpt-4o, Qwen/Qwen2.5-VL-72B-Instruct, ...)
    api_key_env: str        # environment variable holding the key
    concurrency: int
    max_retries: int
    timeout_s: float
    max_tokens: int         # rollout_sft.py's --max_completion_length: traces as long as the RFT model's rollouts may be
    prompt_price: float     # USD per 1M prompt tokens
    completion_price: float  # USD per 1M completion tokens
    temperature: float | None = None  # None: not sent, the server's default (the paper does not say)


def endpoint(url: str) -> str:
    """The chat-completions endpoint of a base URL ('.../v1' -> '.../v1/chat/completions'; a URL that already
    ends in /chat/completions is used as it is)."""
    url = url.rstrip("/")
    return url if url.endswith("/chat/completions") else url + "/chat/completions"


def public_url(url: str) -> str:
    """The URL without user info, query or fragment: what may be printed and recorded."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urllib.parse.urlunsplit((parts.scheme, host, parts.path, "", ""))


def config_from_args(args) -> TeacherConfig:
    """Check the --teacher_* flags and build the config; every failure stops before any request is sent."""
    if args.source != "rea_external":
        common.fail("--teacher_url only applies to --source rea_external (the paper's SFT-Rea-4o).")
    if getattr(args, "traces", ""):
        common.fail("--traces and --teacher_url both give rea_external its reasoning: choose one.")
    if not args.teacher_model:
        common.fail("--teacher_url needs --teacher_model (the server's model name, e.g. gpt-4o).")
    parts = urllib.parse.urlsplit(args.teacher_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        common.fail(f"--teacher_url {public_url(args.teacher_url)!r}: not an http(s) URL (e.g. "
                    "https://api.openai.com/v1 or http://localhost:8000/v1).")
    if parts.username or parts.password:
        # Not echoed: the user info may be the key itself.
        common.fail("--teacher_url holds a user name or password: put the key in the environment variable named "
                    "by --teacher_api_key_env instead (it is sent as a Bearer token).")
    if not args.teacher_api_key_env:
        common.fail("--teacher_api_key_env is empty: name the environment variable that holds the API key.")
    common.check_ranges(args, {"teacher_concurrency": ">= 1", "teacher_max_retries": ">= 0",
                               "teacher_timeout_s": "> 0", "teacher_prompt_price": ">= 0",
                               "teacher_completion_price": ">= 0", "max_completion_length": ">= 1"})
    if not os.environ.get(args.teacher_api_key_env) and parts.hostname.endswith("openai.com"):
        common.fail(f"--teacher_url points at OpenAI but ${args.teacher_api_key_env} is not set: export the key "
                    f"in that variable (or name another one with --teacher_api_key_env).")
    return TeacherConfig(url=args.teacher_url, model=args.teacher_model, api_key_env=args.teacher_api_key_env,
                         concurrency=args.teacher_concurrency, max_retries=args.teacher_max_retries,
                         timeout_s=args.teacher_timeout_s, max_tokens=args.max_completion_length,
                         prompt_price=args.teacher_prompt_price, completion_price=args.teacher_completion_price)


# ----------------------------------------------------------------------------------------------------------
# Pure pieces: request, reply parsing, judging, backoff, cost (tests check these by hand)
# ----------------------------------------------------------------------------------------------------------
def image_data_url(image) -> str:
    """A PIL image as a base64 PNG data URL (lossless: a JPEG would blur the edges the puzzle is about)."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def build_messages(question: str, images: list, answer: list[int], rows: int, cols: int) -> list[dict]:
    """Chat messages for one puzzle: images first (as in the student's prompt), then the question and answer."""
    content = [{"type": "image_url", "image_url": {"url": image_data_url(image)}} for image in images]
    content.append({"type": "text", "text": USER_TEMPLATE.format(question=question,
                                                                 answer_grid=jigsaw.answer_text(answer, rows, cols))})
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": content}]


def build_payload(config: TeacherConfig, messages: list[dict]) -> bytes:
    # No `stop`: the prompt asks for nothing after </answer>, and transformers serve fails with HTTP 500 on any
    # `stop` for a Qwen2.5-VL (it hands stop_strings the processor, not a tokenizer).
    body = {"model": config.model, "messages": messages, "max_tokens": config.max_tokens, "n": 1}
    if config.temperature is not None:
        body["temperature"] = config.temperature
    return json.dumps(body).encode()


class MalformedReply(ValueError):
    """A 2xx reply that is not a chat completion (not JSON, no choices, no text)."""


# Where servers put the reasoning they parse out of a reply (see the module docstring), in the order read.
REASONING_FIELDS = ("reasoning_content", "reasoning")


def _text(value) -> str | None:
    """A message field as text: a string, or the text parts of a list of content parts; else None."""
    if isinstance(value, list):  # some servers return content parts
        texts = [part.get("text") for part in value if isinstance(part, dict) and part.get("type") == "text"]
        value = "".join(t for t in texts if isinstance(t, str)) if texts else None
    return value if isinstance(value, str) else None


def parse_reply(body: bytes) -> dict:
    """{"content", "reasoning_content", "finish_reason", "prompt_tokens", "completion_tokens"} of a
    chat-completions reply body, or MalformedReply. reasoning_content is the reasoning the server returned in a
    field of its own (REASONING_FIELDS, the first non-empty one), None when it sent none; token counts are None
    when the server sends no usage. A reply with reasoning but an empty or null content is a reply (the answer
    may be missing: judge says so)."""
    try:
        reply = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise MalformedReply(f"not JSON ({type(err).__name__}, {len(body)} bytes)") from None
    if not isinstance(reply, dict):
        raise MalformedReply(f"JSON {type(reply).__name__}, not an object")
    choices = reply.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        error = reply.get("error")
        detail = f": {str(error.get('message', ''))[:200]}" if isinstance(error, dict) else ""
        raise MalformedReply(f"no choices{detail}")
    message = choices[0].get("message")
    message = message if isinstance(message, dict) else {}
    content = _text(message.get("content"))
    reasoning = next((text for text in (_text(message.get(field)) for field in REASONING_FIELDS)
                      if text and text.strip()), None)
    if content is None and reasoning is None:
        raise MalformedReply("choices[0].message.content is not text")
    usage = reply.get("usage") if isinstance(reply.get("usage"), dict) else {}

    def count(name):
        value = usage.get(name)
        return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None
    finish = choices[0].get("finish_reason")
    return {"content": content or "", "reasoning_content": reasoning,
            "finish_reason": finish if isinstance(finish, str) else None,
            "prompt_tokens": count("prompt_tokens"), "completion_tokens": count("completion_tokens")}


def full_text(content: str, reasoning_content: str | None) -> str:
    """The reply as one text: the separate reasoning field, when there is one, put back in its <think> block
    before the content ("<answer>3 1 4 2</answer>" + "sky on top" -> "<think>sky on top</think><answer>...")."""
    return f"<think>{reasoning_content}</think>{content}" if reasoning_content else content


def judge(content: str, answer: list[int]) -> tuple[str, str | None]:
    """(status, reasoning) of a teacher reply: 'ok' with the text of its first <think> block when the last
    <answer> block is the true permutation; otherwise 'wrong_answer' (another permutation), 'no_answer' (no
    answer block that parses, e.g. a reply cut at the token cap) or 'no_think' (right answer, no reasoning)."""
    parsed = jigsaw.extract_answer(content, len(answer))
    if parsed is None:
        return "no_answer", None
    if list(parsed) != list(answer):
        return "wrong_answer", None
    start = content.find("<think>")
    end = content.find("</think>", start + len("<think>")) if start >= 0 else -1
    reasoning = content[start + len("<think>"):end].strip() if end >= 0 else ""
    return ("ok", reasoning) if reasoning else ("no_think", None)


def parse_retry_after(headers) -> float | None:
    """Seconds to wait from a reply's headers: retry-after-ms (OpenAI's, milliseconds), else Retry-After in
    seconds or as an HTTP date (RFC 9110). None when absent or unreadable."""
    if headers is None:
        return None
    value = headers.get("retry-after-ms")
    if value is not None:
        try:
            return max(0.0, float(value) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - time.time())


def retry_delay(attempt: int, retry_after: float | None, rng: random.Random | None = None) -> float:
    """Seconds before retry number attempt+1 (attempt counts from 0): the server's Retry-After when it sent one
    (capped at RETRY_AFTER_MAX_S), else min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2^attempt) * U(0.75, 1)."""
    if retry_after is not None:
        return min(retry_after, RETRY_AFTER_MAX_S)
    jitter = 1.0 - 0.25 * (rng or random).random()
    return min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2 ** attempt) * jitter


def cost_usd(prompt_tokens: int, completion_tokens: int, prompt_price: float, completion_price: float) -> float:
    """Estimated cost: tokens times the price per 1M tokens. 1.2M prompt + 0.3M completion tokens at GPT-4o's
    $2.50 / $10.00 -> 3.00 + 3.00 = $6.00."""
    return prompt_tokens / 1e6 * prompt_price + completion_tokens / 1e6 * completion_price


def redact(text: str, secret: str) -> str:
    return text.replace(secret, "[redacted]") if secret else text


def early_stop_message(failures: list[tuple[str, str]], replies: int, failing_s: float, config: TeacherConfig,
                       models: list[str] | None = None) -> str:
    """Why the run stops early, naming the flag to fix. failures: (kind, detail) of the requests that failed in a
    row, kind connection | timeout | model (an HTTP error that names --teacher_model) | http_5xx | http_4xx |
    malformed; the cause shown is the first 'model' failure, else the last failure. Example: 3 x ('connection',
    'ConnectionRefusedError ...') before any reply -> "the first 3 requests to http://127.0.0.1:9/v1/chat/
    completions all failed, none was answered: could not connect (...). Is the server running, on this host and
    port? Check --teacher_url." """
    url = public_url(endpoint(config.url))
    kind, detail = next((f for f in failures if f[0] == "model"), failures[-1])
    head = (f"the first {len(failures)} requests to {url} all failed, none was answered" if replies == 0 else
            f"no reply from {url} for {failing_s:.0f} s ({len(failures)} failed requests in a row)")
    listed = f" (the server lists: {', '.join(models)})" if models else ""
    if kind == "connection":
        cause = f"{detail}. Is the server running, on this host and port? Check --teacher_url."
    elif kind == "timeout":
        cause = (f"{detail}: the server takes connections but does not answer (stuck, overloaded or still loading "
                 "the model). Check the server's log, and raise --teacher_timeout_s if one reply takes longer.")
    elif kind == "model":
        cause = f"{detail}: the server's error names the model. Check --teacher_model {config.model!r}{listed}."
    elif kind == "http_5xx":
        cause = (f"{detail}. Some servers answer an unknown model name with HTTP 500 (transformers serve does): "
                 f"check --teacher_model {config.model!r}{listed}, then the server's log.")
    elif kind == "http_4xx":
        cause = (f"{detail}: the server refuses these requests. Check --teacher_model {config.model!r}{listed} (a "
                 "model without image input refuses them) and the server's log.")
    else:
        cause = (f"{detail}: the replies are not chat completions. Is --teacher_url the API's base URL (e.g. "
                 "https://api.openai.com/v1 or http://localhost:8000/v1)?")
    return f"{head}: {cause}"


# ----------------------------------------------------------------------------------------------------------
# HTTP client: one POST (with its deadline), then the retry loop around it
# ----------------------------------------------------------------------------------------------------------
class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect would send the Authorization header to another URL: refuse it (the 3xx becomes an error)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


class _Request:
    """One HTTP exchange: its socket once connected, and whether its deadline passed."""
    __slots__ = ("sock", "expired")

    def __init__(self):
        self.sock = None
        self.expired = False


def _shut(sock) -> None:
    try:  # the plain socket's shutdown (an SSL socket's would first drop its TLS state under the reader)
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:
        pass


class InFlight:
    """The requests in flight, so that a request's deadline or Ctrl-C can end it from another thread: shutting
    its socket down makes a recv blocked on it return at once. (A socket timeout alone restarts at every byte, so
    a reply sent slowly was never timed out, and nothing could end a request early.)"""

    def __init__(self, stop: threading.Event):
        self.lock = threading.Lock()
        self.requests: set[_Request] = set()
        self.local = threading.local()  # the request this worker thread is sending
        self.stop = stop

    def begin(self, request: _Request) -> None:
        with self.lock:
            self.requests.add(request)
        self.local.request = request

    def end(self, request: _Request) -> None:
        with self.lock:
            self.requests.discard(request)
        self.local.request = None

    def connected(self, sock) -> None:
        """Called by the connection, in the worker thread, once its socket is open."""
        request = getattr(self.local, "request", None)
        if request is None:  # not a tracked request (the /models look-up)
            return
        with self.lock:
            request.sock = sock
            cut = request.expired or self.stop.is_set()
        if cut:
            _shut(sock)

    def expire(self, request: _Request) -> None:
        """The request's deadline (a timer thread)."""
        with self.lock:
            if request not in self.requests:  # it ended in time
                return
            request.expired = True
            sock = request.sock
        if sock is not None:
            _shut(sock)

    def cut_all(self) -> int:
        """End every request in flight now (Ctrl-C); the number ended."""
        with self.lock:
            requests = list(self.requests)
        for request in requests:
            if request.sock is not None:
                _shut(request.sock)
        return len(requests)


class _Tracked:
    """Mixin of urllib's HTTP(S) handlers: their connections report their socket to InFlight on connect.
    Proxies from the environment (HTTPS_PROXY, NO_PROXY) work as with the stock handlers."""

    def __init__(self, inflight: InFlight):
        super().__init__()
        self.inflight = inflight

    def do_open(self, http_class, req, **kwargs):
        inflight = self.inflight

        class Connection(http_class):
            def connect(self):
                super().connect()
                inflight.connected(self.sock)
        return super().do_open(Connection, req, **kwargs)


class _TrackedHTTP(_Tracked, urllib.request.HTTPHandler):
    pass


class _TrackedHTTPS(_Tracked, urllib.request.HTTPSHandler):
    pass


class Slots:
    """At most `limit` requests in flight. Halved when a request times out while the server answered others: a
    server that runs fewer requests at once than are sent (transformers serve runs one) queues the rest, and that
    wait counts against each request's --teacher_timeout_s; the wait for a slot here does not."""

    def __init__(self, limit: int):
        self.cond = threading.Condition()
        self.limit = limit
        self.used = 0

    def acquire(self, stop: threading.Event) -> int | None:
        """Wait for a slot; the limit when it was taken (see lower), None once the run stops."""
        with self.cond:
            while self.used >= self.limit and not stop.is_set():
                self.cond.wait(0.1)
            if stop.is_set():
                return None
            self.used += 1
            return self.limit

    def release(self) -> None:
        with self.cond:
            self.used -= 1
            self.cond.notify_all()

    def lower(self, seen_limit: int) -> int | None:
        """Halve the limit, once per limit (requests sent under the same limit that time out together lower it
        once); the new limit, or None when it was not changed."""
        with self.cond:
            if self.limit != seen_limit or self.limit == 1:
                return None
            self.limit = max(1, self.limit // 2)
            return self.limit


class TeacherFatal(RuntimeError):
    """An error every puzzle would meet (wrong key, model or URL, a dead server): the run stops."""


class Counters:
    """Event counts shared by the worker threads."""

    def __init__(self):
        self._lock = threading.Lock()
        self.values: dict[str, int] = {}

    def add(self, name: str, amount: int = 1) -> None:
        with self._lock:
            self.values[name] = self.values.get(name, 0) + amount


CANCELLED = {"status": "cancelled", "error": "run stopped"}


class TeacherClient:
    def __init__(self, config: TeacherConfig):
        self.config = config
        self.url = endpoint(config.url)
        self.key = os.environ.get(config.api_key_env, "")
        self.headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.key:
            self.headers["Authorization"] = f"Bearer {self.key}"
        self.counts = Counters()
        self.stop = threading.Event()
        self.inflight = InFlight(self.stop)
        self.slots = Slots(config.concurrency)
        self.opener = urllib.request.build_opener(_NoRedirect(), _TrackedHTTP(self.inflight),
                                                  _TrackedHTTPS(self.inflight))
        # Early stop: replies this run, and the failures since the last reply (kind, detail).
        self.health = threading.Lock()
        self.replies = 0
        self.failures: list[tuple[str, str]] = []
        self.failing_since = 0.0
        self.last_reply_at = float("-inf")

    def clean(self, text: str) -> str:
        return redact(text, self.key)

    def post(self, payload: bytes, request: _Request) -> tuple[int, object, bytes]:
        """(status, headers, body) of one POST; HTTP error statuses are returned, transport failures raise
        (TimeoutError, OSError, http.client.HTTPException). The request is ended --teacher_timeout_s after it is
        sent, reply or not (request.expired tells); the socket timeout is the same, a backstop."""
        http_request = urllib.request.Request(self.url, data=payload, headers=self.headers, method="POST")
        deadline = threading.Timer(self.config.timeout_s, self.inflight.expire, (request,))
        deadline.daemon = True
        self.inflight.begin(request)
        deadline.start()
        try:
            with self.opener.open(http_request, timeout=self.config.timeout_s) as response:
                return response.status, response.headers, response.read()
        except urllib.error.HTTPError as err:  # a status >= 300: the reply itself is what we want
            with err:
                return err.code, err.headers, err.read()
        finally:
            deadline.cancel()
            self.inflight.end(request)

    def server_models(self) -> list[str]:
        """Up to 10 model names the server lists at GET {url}/models (OpenAI, vLLM, SGLang and transformers serve
        have it), for an error message; [] when that cannot be read. Untrusted text: JSON-parsed, cut short."""
        url = self.url[:-len("/chat/completions")] + "/models" if self.url.endswith("/chat/completions") else ""
        try:
            with self.opener.open(urllib.request.Request(url, headers=self.headers), timeout=MODELS_TIMEOUT_S) as reply:
                listing = json.loads(reply.read(1_000_000).decode("utf-8"))
        except Exception:  # noqa: BLE001 - only a hint for a message
            return []
        data = listing.get("data") if isinstance(listing, dict) else None
        names = [item["id"] for item in data if isinstance(item, dict) and isinstance(item.get("id"), str)] \
            if isinstance(data, list) else []
        shown = [repr(self.clean(" ".join(name.split()))[:100]) for name in names[:10]]
        return shown + ([f"... {len(names) - 10} more"] if len(names) > 10 else [])

    def http_fatal(self, status: int, detail: str, code: str) -> str | None:
        """The message of an HTTP error that every request would meet, None for one worth retrying or that is
        this puzzle's own."""
        url = public_url(self.url)
        names_model = code == "model_not_found" or (bool(self.config.model) and self.config.model in detail)
        if status in (401, 403):
            return (f"{url} answered HTTP {status} ({detail}): the key was refused; check ${self.config.api_key_env} "
                    f"(or --teacher_api_key_env), --teacher_url and --teacher_model.")
        if names_model and 400 <= status < 500 and status not in RETRY_STATUSES:
            models = self.server_models()
            listed = f" (the server lists: {', '.join(models)})" if models else ""
            return (f"{url} answered HTTP {status} ({detail}): the server does not serve --teacher_model "
                    f"{self.config.model!r}{listed}; check the name.")
        if status == 404:
            return (f"{url} answered HTTP 404 ({detail}): no chat-completions endpoint there; check --teacher_url "
                    "(the API's base URL, e.g. https://api.openai.com/v1 or http://localhost:8000/v1) and "
                    "--teacher_model.")
        if 300 <= status < 400:
            return (f"{url} answered HTTP {status}, a redirect (refused: it would send the key to another URL); "
                    "check --teacher_url (give the final URL).")
        if status == 429 and code == "insufficient_quota":  # OpenAI's "no credit left": retrying cannot help
            return (f"{url} answered HTTP 429 insufficient_quota ({detail}): the account of "
                    f"${self.config.api_key_env} has no credit left.")
        return None

    def replied(self) -> None:
        with self.health:
            self.replies += 1
            self.failures.clear()
            self.last_reply_at = time.monotonic()

    def failed(self, kind: str, detail: str) -> str | None:
        """Record a failed request; the early-stop message when the run should stop (EARLY_STOP_FAILURES in a row
        before any reply, or STALL_S of failures since the last one)."""
        now = time.monotonic()
        with self.health:
            if self.stop.is_set():  # another request already stopped the run
                return None
            if not self.failures:
                self.failing_since = now
            self.failures.append((kind, self.clean(detail)))
            failures, replies, failing_s = list(self.failures), self.replies, now - self.failing_since
        if len(failures) < EARLY_STOP_FAILURES or (replies and failing_s < STALL_S):
            return None
        model_suspect = any(k in ("model", "http_5xx", "http_4xx") for k, _ in failures)
        return early_stop_message(failures, replies, failing_s, self.config,
                                  self.server_models() if model_suspect else None)

    def ask(self, payload: bytes) -> dict:
        """One puzzle's reply with retries: {"status": "answered", content, reasoning_content, finish_reason,
        tokens, attempts}, {"status": "gave_up" | "rejected" | "cancelled", "error"}, or TeacherFatal."""
        counts, last_error = self.counts, ""
        for attempt in range(self.config.max_retries + 1):
            seen_limit = self.slots.acquire(self.stop)  # waiting for a slot is not part of the request's time
            if seen_limit is None:
                return CANCELLED
            counts.add("requests")
            request, sent_at = _Request(), time.monotonic()
            retry_after, failure = None, None
            try:
                try:
                    status, headers, body = self.post(payload, request)
                finally:
                    self.slots.release()
            except Exception as err:  # noqa: BLE001 - transport failures of many types; classified below
                if self.stop.is_set() and not request.expired:
                    return CANCELLED  # ended by Ctrl-C or a stop of the run
                reason = getattr(err, "reason", err)  # URLError wraps the socket's error
                if request.expired or isinstance(err, TimeoutError) or isinstance(reason, TimeoutError):
                    counts.add("timeouts")
                    if request.sock is None:
                        last_error = f"could not connect within --teacher_timeout_s {self.config.timeout_s:g}"
                        failure = ("connection", last_error)
                    else:
                        last_error = f"no reply within --teacher_timeout_s {self.config.timeout_s:g}"
                        failure = ("timeout", last_error)
                    if self.last_reply_at > sent_at:  # the server answered others meanwhile: busy, not stuck
                        lowered = self.slots.lower(seen_limit)
                        if lowered:
                            counts.add("in_flight_lowered")
                            log(f"a request timed out while the server answered others: it runs fewer at once "
                                f"than are sent; now at most {lowered} in flight (the rest wait here, untimed)")
                elif isinstance(err, (OSError, http.client.HTTPException)):
                    counts.add("connection_errors")
                    last_error = f"could not connect or connection lost ({type(reason).__name__}: {reason})"
                    failure = ("connection", last_error)
                else:  # e.g. ValueError from urllib for a URL it cannot open: every puzzle would meet it
                    raise TeacherFatal(f"request failed ({type(err).__name__}: {self.clean(str(err))[:200]})") \
                        from None
            else:
                if 200 <= status < 300:
                    try:
                        reply = parse_reply(body)
                    except MalformedReply as err:
                        if request.expired:  # the deadline cut the body short
                            counts.add("timeouts")
                            last_error = f"no reply within --teacher_timeout_s {self.config.timeout_s:g}"
                            failure = ("timeout", last_error)
                        elif self.stop.is_set():
                            return CANCELLED
                        else:
                            counts.add("malformed_replies")
                            last_error = f"malformed reply: {err}"
                            failure = ("malformed", last_error)
                    else:
                        self.replied()
                        return {"status": "answered", "attempts": attempt + 1, **reply}
                else:
                    detail, code = self.clean(_error_detail(body)), _error_code(body)
                    fatal = self.http_fatal(status, detail, code)
                    if fatal:
                        self.stop.set()
                        raise TeacherFatal(fatal)
                    last_error = f"HTTP {status} ({detail})"
                    names_model = bool(self.config.model) and self.config.model in detail
                    kind = "model" if names_model else "http_5xx" if status >= 500 else "http_4xx"
                    if status in RETRY_STATUSES or status >= 500:
                        counts.add("http_429" if status == 429 else "http_5xx" if status >= 500 else
                                   f"http_{status}")
                        retry_after = parse_retry_after(headers)
                        if status != 429:  # a rate limit says the server is alive: not a failure to stop on
                            failure = (kind, last_error)
                    else:  # any other 4xx: this puzzle's problem, unless every request meets it
                        counts.add("rejected")
                        message = self.failed(kind, last_error)
                        if message:
                            self.stop.set()
                            raise TeacherFatal(message)
                        return {"status": "rejected", "error": last_error}
            if failure:
                message = self.failed(*failure)
                if message:
                    self.stop.set()
                    raise TeacherFatal(message)
            if attempt == self.config.max_retries:
                break
            counts.add("retries")
            if self.stop.wait(retry_delay(attempt, retry_after)):
                return CANCELLED
        counts.add("gave_up")
        return {"status": "gave_up", "error": self.clean(last_error)}


def _error_json(body: bytes) -> dict:
    """The "error" object of an API error body ({"error": {"message": ..., "code": ...}}), or {}."""
    try:
        error = json.loads(body.decode("utf-8", "replace") if isinstance(body, bytes) else str(body)).get("error")
    except (json.JSONDecodeError, AttributeError):
        return {}
    return error if isinstance(error, dict) else {}


def _error_detail(body: bytes) -> str:
    """The error message of an API error body, or the body's first characters (FastAPI's {"detail": ...} and
    plain-text bodies such as transformers serve's "Internal Server Error" are shown as they are)."""
    message = _error_json(body).get("message")
    text = message if isinstance(message, str) else (
        body.decode("utf-8", "replace") if isinstance(body, bytes) else str(body))
    return " ".join(text.split())[:200] or "empty body"


def _error_code(body: bytes) -> str:
    """The error code of an API error body (OpenAI: model_not_found, insufficient_quota, ...), or ""."""
    code = _error_json(body).get("code")
    return code if isinstance(code, str) else ""


# ----------------------------------------------------------------------------------------------------------
# Shard: append-only JSONL of answered puzzles (write + fsync), the resume state
# ----------------------------------------------------------------------------------------------------------
def shard_paths(out: str) -> tuple[Path, Path]:
    out_path = Path(out)
    return out_path.with_name(out_path.name + ".teacher.jsonl"), out_path.with_name(out_path.name + ".teacher.json")


def check_shard_meta(meta_path: Path, shard: Path, meta: dict) -> None:
    """Refuse to resume a shard written with another teacher, prompt or token cap."""
    if meta_path.exists() and shard.exists() and shard.stat().st_size > 0:
        old = json.loads(meta_path.read_text())
        diff = [f"{key}: shard {old.get(key)!r} vs now {meta[key]!r}" for key in meta if old.get(key) != meta[key]]
        if diff:
            common.fail(f"{meta_path} was written with other teacher settings ({'; '.join(diff)}). Rerun with the "
                        f"same flags to resume, or delete {meta_path} and {shard} to start over.")
    else:
        files.write_json_atomic(meta_path, meta)


# ----------------------------------------------------------------------------------------------------------
# The run: every puzzle not yet in the shard, --teacher_concurrency requests at a time
# ----------------------------------------------------------------------------------------------------------
def make_record(puzzle_id: str, reply: dict, answer: list[int], clean) -> dict:
    """The shard's record of one reply: the raw fields as the server sent them (key redacted), so a rerun can
    judge them again, and the verdict."""
    content = clean(reply["content"])
    reasoning_content = clean(reply["reasoning_content"]) if reply["reasoning_content"] is not None else None
    status, reasoning = judge(full_text(content, reasoning_content), answer)
    return {"id": puzzle_id, "status": status, "reasoning": reasoning, "content": content,
            "reasoning_content": reasoning_content, "finish_reason": reply["finish_reason"],
            "prompt_tokens": reply["prompt_tokens"], "completion_tokens": reply["completion_tokens"],
            "attempts": reply["attempts"]}


def rebuild(record: dict, answer: list[int]) -> dict | None:
    """A shard record judged again from its raw fields (a rerun applies this module's reading of them), or None
    for a record that cannot be rebuilt and is asked again: written by an older teacher.py (no reasoning_content
    key: only message.content was read) and judged no_think, or with no content at all, which is what a reply
    whose reasoning came in the separate field looked like to it."""
    content = record.get("content") if isinstance(record.get("content"), str) else ""
    reasoning_content = record.get("reasoning_content") if isinstance(record.get("reasoning_content"), str) else None
    status, reasoning = judge(full_text(content, reasoning_content), answer)
    if "reasoning_content" not in record and (status == "no_think" or not content.strip()):
        return None
    return {**record, "status": status, "reasoning": reasoning}


def collect_traces(dataset, config: TeacherConfig, out: str, data: str = "", split: str = ""
                   ) -> tuple[dict[str, list[str]], dict]:
    """{puzzle id: [reasoning]} for the puzzles whose reply ended in the true answer, and the statistics
    (teacher_*: this run's request events, and the shard's totals over all runs: answered, ok, dropped by
    reason, tokens, estimated cost). Rows are read and images encoded in this thread; workers talk HTTP and
    append each reply to the shard as it arrives."""
    shard, meta_path = shard_paths(out)
    shard.parent.mkdir(parents=True, exist_ok=True)
    # What changes the traces (not the URL: the same model served on another port or host is the same teacher).
    meta = {"teacher_model": config.model, "prompt_sha256": prompt_sha256(), "max_tokens": config.max_tokens, "temperature": config.temperature,
            "data": data, "split": split}
    check_shard_meta(meta_path, shard, meta)
    client = TeacherClient(config)
    if not client.key:
        log(f"${config.api_key_env} is not set: sending no Authorization header (fine for a local server)")
    ids = [str(i) for i in dataset["id"]]
    answers = dict(zip(ids, (list(answer) for answer in dataset["answer"])))
    done, stale = {}, []
    for puzzle_id, record in files.read_shard(shard).items():
        rebuilt = rebuild(record, answers[puzzle_id]) if puzzle_id in answers else record
        if rebuilt is None:
            stale.append(record)
        else:
            done[puzzle_id] = rebuilt
    if stale:
        tokens = sum((r.get("prompt_tokens") or 0) + (r.get("completion_tokens") or 0) for r in stale)
        log(f"{len(stale)} replies in {shard} were recorded by an older teacher.py, which read only "
            "message.content and judged them 'no reasoning' (a server that returns the reasoning in "
            "reasoning_content, as transformers serve and vLLM do, looked like that); their reasoning was not "
            f"stored, so they are asked again ({tokens} tokens last time)")
    client.counts.add("old_records_asked_again", len(stale))
    todo = [index for index, puzzle_id in enumerate(ids) if puzzle_id not in done]
    log(f"{config.model} at {public_url(endpoint(config.url))}: {len(ids) - len(todo)} of {len(ids)} puzzles already in "
        f"{shard}, {len(todo)} to ask ({config.concurrency} at a time)")
    failures: dict[str, str] = {}
    fatal = None
    pending: dict = {}
    queue = iter(todo)
    shard_lock = threading.Lock()

    def ask_and_record(puzzle_id: str, payload: bytes, answer: list[int]) -> tuple[dict, dict | None]:
        # In the worker: a reply is in the shard the moment it arrives, even while the run is stopping (Ctrl-C
        # reaches only the main thread, so it never cuts this write short).
        result = client.ask(payload)
        if result["status"] != "answered":
            return result, None
        record = make_record(puzzle_id, result, answer, client.clean)
        with shard_lock:
            files.append_shard(shard, [record])
        return result, record

    progress = tqdm(total=len(todo), desc="teacher", unit="puzzle", file=sys.stdout, disable=not todo)
    executor = ThreadPoolExecutor(max_workers=config.concurrency, thread_name_prefix="teacher")
    try:
        while True:
            # Keep at most 2 x concurrency requests prepared (bounded memory for the encoded images).
            while len(pending) < 2 * config.concurrency and not client.stop.is_set():
                index = next(queue, None)
                if index is None:
                    break
                row = dataset[index]
                answer, rows, cols = list(row["answer"]), int(row["rows"]), int(row["cols"])
                payload = build_payload(config, build_messages(row["prompt"], common.row_images(row), answer,
                                                               rows, cols))
                pending[executor.submit(ask_and_record, ids[index], payload, answer)] = ids[index]
            if not pending:
                break
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in finished:
                puzzle_id = pending.pop(future)
                try:
                    result, record = future.result()
                except TeacherFatal as err:
                    fatal = fatal or client.clean(str(err))
                    client.stop.set()  # no new requests and no more retries; replies in flight are still kept
                    continue
                if record is None:
                    if result["status"] != "cancelled":
                        failures[puzzle_id] = f"{result['status']}: {client.clean(result['error'])}"
                    continue
                done[puzzle_id] = record
                client.counts.add("prompt_tokens", result["prompt_tokens"] or 0)
                client.counts.add("completion_tokens", result["completion_tokens"] or 0)
                progress.update(1)
    except BaseException:  # Ctrl-C (or a bug): end the requests in flight now rather than wait out their timeout
        client.stop.set()
        in_flight = client.inflight.cut_all()
        executor.shutdown(wait=True, cancel_futures=True)  # quick: every socket in flight is shut
        progress.close()
        log(f"stopped: {in_flight} request(s) in flight cancelled (a paid API may bill a reply it was writing); "
            f"every reply that arrived is in {shard} ({len(files.read_shard(shard))} puzzles); rerun the same "
            "command to resume")
        raise
    executor.shutdown(wait=True)
    progress.close()

    stats = summarize(done, ids, client.counts.values, config)
    stats["teacher_run_in_flight_limit"] = client.slots.limit
    print_summary(stats, config)
    for puzzle_id, message in list(failures.items())[:10]:
        log(f"  not answered: {puzzle_id} ({message})")
    if fatal:
        common.fail(f"teacher: {fatal} The {stats['teacher_answered']} replies received are kept in {shard}; rerun "
                    "the same command to resume.")
    if failures:
        log(f"warning: {len(failures)} puzzle(s) got no usable reply in this run (see above); rerun the same "
            "command to ask for them again (the answered ones are not asked twice).")
    traces = {puzzle_id: [done[puzzle_id]["reasoning"]] for puzzle_id in ids
              if puzzle_id in done and done[puzzle_id].get("status") == "ok" and done[puzzle_id].get("reasoning")}
    return traces, stats


def summarize(done: dict[str, dict], ids: list[str], events: dict[str, int], config: TeacherConfig) -> dict:
    """The teacher's statistics for stats.json: the shard's totals over the puzzles of this run's data (every
    run that wrote them) and this run's request events."""
    records = [done[i] for i in ids if i in done]
    statuses = [r.get("status") for r in records]
    prompt_tokens = sum(r.get("prompt_tokens") or 0 for r in records)
    completion_tokens = sum(r.get("completion_tokens") or 0 for r in records)
    stats = {
        "teacher_model": config.model, "teacher_url": public_url(endpoint(config.url)),
        "teacher_prompt_sha256": prompt_sha256(), "teacher_max_tokens": config.max_tokens,
        "teacher_puzzles": len(ids), "teacher_answered": len(records),
        "teacher_ok": statuses.count("ok"), "teacher_wrong_answer": statuses.count("wrong_answer"),
        "teacher_no_answer": statuses.count("no_answer"), "teacher_no_think": statuses.count("no_think"),
        "teacher_truncated": sum(r.get("finish_reason") == "length" for r in records),
        "teacher_not_answered": len(ids) - len(records),
        "teacher_replies_without_usage": sum(r.get("prompt_tokens") is None for r in records),
        "teacher_prompt_tokens": prompt_tokens, "teacher_completion_tokens": completion_tokens,
        "teacher_prompt_price_per_m": config.prompt_price, "teacher_completion_price_per_m": config.completion_price,
        "teacher_cost_usd_estimate": cost_usd(prompt_tokens, completion_tokens, config.prompt_price,
                                              config.completion_price),
    }
    for name in ("prompt_tokens", "completion_tokens", "requests", "retries", "http_429", "http_5xx", "timeouts",
                 "connection_errors", "malformed_replies", "rejected", "gave_up", "in_flight_lowered",
                 "old_records_asked_again"):
        stats[f"teacher_run_{name}"] = events.get(name, 0)
    for name, value in sorted(events.items()):  # other retried statuses (408, 409)
        stats.setdefault(f"teacher_run_{name}", value)
    return stats


def print_summary(stats: dict, config: TeacherConfig) -> None:
    log(f"{stats['teacher_answered']} of {stats['teacher_puzzles']} puzzles answered: {stats['teacher_ok']} ok, "
        f"{stats['teacher_wrong_answer']} wrong answer, {stats['teacher_no_answer']} no answer, "
        f"{stats['teacher_no_think']} no reasoning (dropped ones stay in the shard, counted)")
    log(f"this run: {stats['teacher_run_requests']} requests, {stats['teacher_run_retries']} retries "
        f"({stats['teacher_run_http_429']} HTTP 429, {stats['teacher_run_http_5xx']} HTTP 5xx, "
        f"{stats['teacher_run_timeouts']} timeouts, {stats['teacher_run_connection_errors']} connection errors, "
        f"{stats['teacher_run_malformed_replies']} malformed replies), {stats['teacher_run_rejected']} rejected, "
        f"{stats['teacher_run_gave_up']} given up; {stats['teacher_run_prompt_tokens']} prompt + "
        f"{stats['teacher_run_completion_tokens']} completion tokens")
    if stats["teacher_no_think"]:
        log(f"note: {stats['teacher_no_think']} replies had the true answer but no reasoning (no <think> block in "
            f"the content, nothing in {' / '.join(REASONING_FIELDS)}): look at their content in the shard")
    log(f"all replies in the shard: {stats['teacher_prompt_tokens']} prompt + "
        f"{stats['teacher_completion_tokens']} completion tokens; "
        f"estimated cost ${stats['teacher_cost_usd_estimate']:.4f} at ${config.prompt_price:g} / "
        f"${config.completion_price:g} per 1M tokens (defaults: GPT-4o's list price; check current prices)")
