"""Reasoning traces from a teacher model, for the paper's SFT-Rea-4o source (rollout_sft.py --source rea_external).

The paper trains SFT-Rea-4o on reasoning written by GPT-4o. This module asks any server that speaks the
OpenAI chat-completions API (POST {url}/chat/completions: OpenAI itself with gpt-4o, or a local vLLM / SGLang
serving a large Qwen2.5-VL) to write, for each puzzle, the reasoning that leads to its true answer. The teacher
sees the puzzle image(s), the student's own question and the true answer; the reply must end in that answer
(parsed with jigsaw.extract_answer: regex only, never eval), else the trace is dropped and counted.

    python rollout_sft.py --source rea_external --data data/jigsaw --output_dir data/sources/rea_4o \\
        --teacher_url https://api.openai.com/v1 --teacher_model gpt-4o        # key in $OPENAI_API_KEY
    python rollout_sft.py --source rea_external --data data/jigsaw --output_dir data/sources/rea_4o \\
        --teacher_url http://localhost:8000/v1 --teacher_model Qwen/Qwen2.5-VL-72B-Instruct \\
        --teacher_prompt_price 0 --teacher_completion_price 0                 # a local server, no key needed

Worked example (2x2 puzzle, true answer 3 1 / 4 2):
    reply "<think>The top-left piece shows sky ...</think><answer>3 1\\n4 2</answer>"  -> ok, reasoning kept
    reply "<think>...</think><answer>3 1\\n2 4</answer>"                          -> wrong_answer, dropped
    reply "The answer is 3 1 4 2."                                               -> no_answer, dropped
    HTTP 429 (Retry-After: 2) -> wait 2 s, ask again; HTTP 500 / timeout / dropped connection -> back off, ask
    again; after --teacher_max_retries failed retries the puzzle is given up for this run (not written), and
    the next run of the same command asks for it again.

Resume: every answered puzzle (ok or dropped) is appended to OUT.teacher.jsonl as soon as its reply arrives,
with write + fsync, so a crash or a dropped connection loses at most the requests in flight. A rerun reads the
shard (a torn last line is dropped), skips the puzzles in it and asks only for the rest; the data set is built
from the shard in data order, so it is the same whatever the order replies came back in. OUT.teacher.json
holds the settings that change what the teacher writes (model, prompt, token cap, data): a resume with other
values is refused rather than mixing two teachers in one data set.

The API key is read from the environment variable named by --teacher_api_key_env (never from a flag, so it is
not in the shell history or in any recorded command line), sent only in the Authorization header, and removed
from every message this module prints or writes (a server may echo a request back in an error body).
Redirects are refused, so the header never goes to a host the user did not name.
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
import runs
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
    body = {"model": config.model, "messages": messages, "max_tokens": config.max_tokens, "n": 1}
    if config.temperature is not None:
        body["temperature"] = config.temperature
    return json.dumps(body).encode()


class MalformedReply(ValueError):
    """A 2xx reply that is not a chat completion (not JSON, no choices, no text)."""


def parse_reply(body: bytes) -> dict:
    """{"content", "finish_reason", "prompt_tokens", "completion_tokens"} of a chat-completions reply body, or
    MalformedReply. Token counts are None when the server sends no usage."""
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
    content = message.get("content") if isinstance(message, dict) else None
    if isinstance(content, list):  # some servers return content parts
        texts = [part.get("text") for part in content if isinstance(part, dict) and part.get("type") == "text"]
        content = "".join(t for t in texts if isinstance(t, str)) if texts else None
    if not isinstance(content, str):
        raise MalformedReply("choices[0].message.content is not text")
    usage = reply.get("usage") if isinstance(reply.get("usage"), dict) else {}

    def count(name):
        value = usage.get(name)
        return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None
    finish = choices[0].get("finish_reason")
    return {"content": content, "finish_reason": finish if isinstance(finish, str) else None,
            "prompt_tokens": count("prompt_tokens"), "completion_tokens": count("completion_tokens")}


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


# ----------------------------------------------------------------------------------------------------------
# HTTP client: one POST, then the retry loop around it
# ----------------------------------------------------------------------------------------------------------
class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect would send the Authorization header to another URL: refuse it (the 3xx becomes an error)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


class TeacherFatal(RuntimeError):
    """An error every puzzle would meet (wrong key, model or URL): the run stops."""


class Counters:
    """Event counts shared by the worker threads."""

    def __init__(self):
        self._lock = threading.Lock()
        self.values: dict[str, int] = {}

    def add(self, name: str, amount: int = 1) -> None:
        with self._lock:
            self.values[name] = self.values.get(name, 0) + amount


class TeacherClient:
    def __init__(self, config: TeacherConfig):
        self.config = config
        self.url = endpoint(config.url)
        self.key = os.environ.get(config.api_key_env, "")
        self.headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.key:
            self.headers["Authorization"] = f"Bearer {self.key}"
        # Proxies from the environment (HTTPS_PROXY, NO_PROXY) as urllib reads them; no redirects.
        self.opener = urllib.request.build_opener(_NoRedirect())
        self.counts = Counters()
        self.stop = threading.Event()

    def clean(self, text: str) -> str:
        return redact(text, self.key)

    def post(self, payload: bytes) -> tuple[int, object, bytes]:
        """(status, headers, body) of one POST; HTTP error statuses are returned, transport failures raise
        (TimeoutError, OSError, http.client.HTTPException). The timeout bounds each socket operation."""
        request = urllib.request.Request(self.url, data=payload, headers=self.headers, method="POST")
        try:
            with self.opener.open(request, timeout=self.config.timeout_s) as response:
                return response.status, response.headers, response.read()
        except urllib.error.HTTPError as err:  # a status >= 300: the reply itself is what we want
            with err:
                return err.code, err.headers, err.read()

    def ask(self, payload: bytes) -> dict:
        """One puzzle's reply with retries: {"status": "answered", content, finish_reason, tokens, attempts},
        {"status": "gave_up" | "rejected" | "cancelled", "error"}, or TeacherFatal."""
        counts, last_error = self.counts, ""
        for attempt in range(self.config.max_retries + 1):
            if self.stop.is_set():
                return {"status": "cancelled", "error": "run stopped"}
            counts.add("requests")
            retry_after = None
            try:
                status, headers, body = self.post(payload)
            except Exception as err:  # noqa: BLE001 - transport failures of many types; classified below
                reason = getattr(err, "reason", err)  # URLError wraps the socket's error
                if isinstance(err, TimeoutError) or isinstance(reason, TimeoutError):
                    counts.add("timeouts")
                    last_error = f"no reply within --teacher_timeout_s {self.config.timeout_s:g}"
                elif isinstance(err, (OSError, http.client.HTTPException)):
                    counts.add("connection_errors")
                    last_error = f"connection error ({type(reason).__name__}: {reason})"
                else:  # e.g. ValueError from urllib for a URL it cannot open: every puzzle would meet it
                    raise TeacherFatal(f"request failed ({type(err).__name__}: {self.clean(str(err))[:200]})") \
                        from None
            else:
                if 200 <= status < 300:
                    try:
                        reply = parse_reply(body)
                    except MalformedReply as err:
                        counts.add("malformed_replies")
                        last_error = f"malformed reply: {err}"
                    else:
                        return {"status": "answered", "attempts": attempt + 1, **reply}
                else:
                    detail = self.clean(_error_detail(body))
                    if status in FATAL_STATUSES or 300 <= status < 400:
                        raise TeacherFatal(f"{public_url(self.url)} answered HTTP {status} ({detail}): check "
                                           f"--teacher_url, --teacher_model and ${self.config.api_key_env}.")
                    if status in RETRY_STATUSES or status >= 500:
                        counts.add("http_429" if status == 429 else "http_5xx" if status >= 500 else
                                   f"http_{status}")
                        retry_after = parse_retry_after(headers)
                        last_error = f"HTTP {status} ({detail})"
                    else:
                        counts.add("rejected")
                        return {"status": "rejected", "error": f"HTTP {status} ({detail})"}
            if attempt == self.config.max_retries:
                break
            counts.add("retries")
            if self.stop.wait(retry_delay(attempt, retry_after)):
                return {"status": "cancelled", "error": "run stopped"}
        counts.add("gave_up")
        return {"status": "gave_up", "error": self.clean(last_error)}


def _error_detail(body: bytes) -> str:
    """The error message of an API error body ({"error": {"message": ...}}), or its first characters."""
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else str(body)
    try:
        error = json.loads(text).get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            text = error["message"]
    except (json.JSONDecodeError, AttributeError):
        pass
    return " ".join(text.split())[:200] or "empty body"


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
        runs.write_json_atomic(meta_path, meta)


# ----------------------------------------------------------------------------------------------------------
# The run: every puzzle not yet in the shard, --teacher_concurrency requests at a time
# ----------------------------------------------------------------------------------------------------------
def collect_traces(dataset, config: TeacherConfig, out: str, data: str = "", split: str = ""
                   ) -> tuple[dict[str, list[str]], dict]:
    """{puzzle id: [reasoning]} for the puzzles whose reply ended in the true answer, and the statistics
    (teacher_*: this run's request events, and the shard's totals over all runs: answered, ok, dropped by
    reason, tokens, estimated cost). Rows are read and images encoded in this thread; workers only talk HTTP."""
    shard, meta_path = shard_paths(out)
    shard.parent.mkdir(parents=True, exist_ok=True)
    # What changes the traces (not the URL: the same model served on another port or host is the same teacher).
    meta = {"teacher_model": config.model, "prompt_sha256": prompt_sha256(), "max_tokens": config.max_tokens, "temperature": config.temperature,
            "data": data, "split": split}
    check_shard_meta(meta_path, shard, meta)
    client = TeacherClient(config)
    if not client.key:
        log(f"${config.api_key_env} is not set: sending no Authorization header (fine for a local server)")
    done = runs.read_shard(shard)
    ids = [str(i) for i in dataset["id"]]
    todo = [index for index, puzzle_id in enumerate(ids) if puzzle_id not in done]
    log(f"{config.model} at {public_url(endpoint(config.url))}: {len(ids) - len(todo)} of {len(ids)} puzzles already in "
        f"{shard}, {len(todo)} to ask ({config.concurrency} at a time)")
    failures: dict[str, str] = {}
    fatal = None
    pending: dict = {}
    queue = iter(todo)
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
                pending[executor.submit(client.ask, payload)] = (ids[index], answer)
            if not pending:
                break
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in finished:
                puzzle_id, answer = pending.pop(future)
                try:
                    result = future.result()
                except TeacherFatal as err:
                    fatal = fatal or client.clean(str(err))
                    client.stop.set()  # no new requests and no more retries; replies in flight are still kept
                    continue
                if result["status"] != "answered":
                    if result["status"] != "cancelled":
                        failures[puzzle_id] = f"{result['status']}: {client.clean(result['error'])}"
                    continue
                status, reasoning = judge(result["content"], answer)
                record = {"id": puzzle_id, "status": status, "reasoning": reasoning,
                          "content": client.clean(result["content"]), "finish_reason": result["finish_reason"],
                          "prompt_tokens": result["prompt_tokens"], "completion_tokens": result["completion_tokens"],
                          "attempts": result["attempts"]}
                runs.append_shard(shard, [record])
                done[puzzle_id] = record
                client.counts.add("prompt_tokens", result["prompt_tokens"] or 0)
                client.counts.add("completion_tokens", result["completion_tokens"] or 0)
                progress.update(1)
    except BaseException:
        client.stop.set()  # Ctrl-C: workers stop retrying; everything already appended stays in the shard
        if pending:
            log(f"stopping: waiting for {len(pending)} request(s) in flight (at most --teacher_timeout_s); "
                f"{len(done)} replies are safe in {shard}")
        raise
    finally:
        executor.shutdown(wait=True, cancel_futures=True)
        progress.close()

    stats = summarize(done, ids, client.counts.values, config)
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
                 "connection_errors", "malformed_replies", "rejected", "gave_up"):
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
    log(f"all replies in the shard: {stats['teacher_prompt_tokens']} prompt + "
        f"{stats['teacher_completion_tokens']} completion tokens; "
        f"estimated cost ${stats['teacher_cost_usd_estimate']:.4f} at ${config.prompt_price:g} / "
        f"${config.completion_price:g} per 1M tokens (defaults: GPT-4o's list price; check current prices)")
