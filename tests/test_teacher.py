"""teacher.py: the SFT-Rea-4o traces from an OpenAI-compatible server, against a real HTTP server on 127.0.0.1
that answers like the chat-completions API and can be scripted to fail in every way a real one does."""
import dataclasses
import email.utils
import json
import os
import random
import signal
import socket
import subprocess
import sys
import shutil
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import pytest

import common
import files
import jigsaw
import rollout_sft
import teacher

ROOT = Path(__file__).resolve().parents[1]
KEY = "sk-test-3f9a1c7e5b2d4086a1b2c3d4e5f60718"
KEY_ENV = "KIT_TEST_TEACHER_KEY"
# The lead may rename --out to --output_dir (the kit's shared vocabulary); the tests follow either.
OUT = "--output_dir" if "output_dir" in {f.name for f in dataclasses.fields(rollout_sft.Args)} else "--out"


# ---------------------------------------------------------------------------------------------------------
# A scripted chat-completions server
# ---------------------------------------------------------------------------------------------------------
class FakeAPI:
    """Answers POST /v1/chat/completions. The puzzle of a request is recognised by its image (the data URL the
    client sends), and each puzzle has a script: the behaviours of its successive requests ("correct" once the
    script is used up). Every request is recorded as (time, puzzle id, behaviour)."""

    def __init__(self, puzzles: dict[str, tuple[str, list[int], int, int]]):
        self.puzzles = puzzles            # image data URL -> (id, answer, rows, cols)
        self.script: dict[str, list[str]] = {}
        self.default = "correct"
        self.requests: list[tuple[float, str, str]] = []
        self.lock = threading.Lock()
        self.slow_s = 1.0
        self.serial = threading.Lock()    # held while answering when one_at_a_time (as transformers serve runs)
        self.one_at_a_time = False
        self.release = threading.Event()  # ends every "hang" (set at teardown)
        self.sent: list[str] = []         # puzzle ids whose reply was written in full

    def next_behaviour(self, puzzle_id: str) -> str:
        with self.lock:
            queue = self.script.get(puzzle_id, [])
            behaviour = queue.pop(0) if queue else self.default
            self.requests.append((time.monotonic(), puzzle_id, behaviour))
            return behaviour

    def requested(self) -> list[str]:
        return [puzzle_id for _, puzzle_id, _ in self.requests]


def reply_text(puzzle_id: str, answer: list[int], rows: int, cols: int) -> str:
    return (f"<think>Reasoning for {puzzle_id}: the colours continue across the edges, so the pieces go "
            f"here.</think>\n<answer>\n{jigsaw.answer_text(answer, rows, cols)}\n</answer>")


def make_handler(api: FakeAPI):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # keep the test output clean
            pass

        def send(self, status: int, body: bytes, headers: dict | None = None):
            try:
                headers = {"Content-Type": "application/json", **(headers or {})}
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                for name, value in headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout test)
                pass

        def do_POST(self):
            if api.one_at_a_time:
                with api.serial:
                    return self.answer()
            return self.answer()

        def answer(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if self.path == "/moved/v1/chat/completions":  # a redirect would carry the key elsewhere
                return self.send(307, b"", {"Location": "/v1/chat/completions"})
            if self.path != "/v1/chat/completions":
                return self.send(404, b'{"error": {"message": "no such route"}}')
            if self.headers.get("Authorization") != f"Bearer {KEY}":
                return self.send(401, b'{"error": {"message": "Incorrect API key provided"}}')
            parts = body["messages"][1]["content"]
            puzzle_id, answer, rows, cols = api.puzzles[parts[0]["image_url"]["url"]]
            assert body["model"] == "teacher-test" and parts[-1]["type"] == "text"
            assert jigsaw.answer_text(answer, rows, cols) in parts[-1]["text"]  # the teacher is told the answer
            behaviour = api.next_behaviour(puzzle_id)
            content, finish = reply_text(puzzle_id, answer, rows, cols), "stop"
            if behaviour == "drop":  # close the connection without a response
                self.close_connection = True
                return
            if behaviour == "slow":
                time.sleep(api.slow_s)
            if behaviour == "hang":  # takes the request, never answers (until the test ends)
                api.release.wait(60)
                self.close_connection = True
                return
            if behaviour == "trickle":  # headers at once, then the body a few bytes at a time (3 s in all)
                reply = json.dumps({"choices": [{"message": {"content": reply_text(puzzle_id, answer, rows, cols)},
                                                 "finish_reason": "stop"}]}).encode()
                try:
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(reply)))
                    self.end_headers()
                    for start in range(0, len(reply), 8):
                        self.wfile.write(reply[start:start + 8])
                        self.wfile.flush()
                        time.sleep(3 / (len(reply) / 8))
                except (BrokenPipeError, ConnectionResetError):
                    pass
                return
            if behaviour == "500_plain":  # transformers serve's answer to an unknown model name
                return self.send(500, b"Internal Server Error", {"Content-Type": "text/plain; charset=utf-8"})
            if behaviour == "500_model":
                return self.send(500, json.dumps({"error": {"message": f"could not load model {body['model']}"}})
                                 .encode())
            if behaviour == "404_model":  # OpenAI's answer to an unknown model name
                return self.send(404, json.dumps({"error": {
                    "message": f"The model `{body['model']}` does not exist or you do not have access to it.",
                    "type": "invalid_request_error", "param": None, "code": "model_not_found"}}).encode())
            if behaviour == "malformed":
                return self.send(200, b'{"id": "chatcmpl-1", "choices": [{"message": {"content": "<think>')
            if behaviour == "429":
                return self.send(429, b'{"error": {"message": "Rate limit reached"}}')
            if behaviour == "429_retry_after":
                return self.send(429, b'{"error": {"message": "Rate limit reached"}}', {"Retry-After": "1"})
            if behaviour == "429_retry_after_ms":
                return self.send(429, b'{"error": {"message": "Rate limit"}}', {"retry-after-ms": "150"})
            if behaviour == "500":  # a broken server that echoes the request's headers back
                echo = json.dumps({"error": {"message": f"internal error; request had Authorization: "
                                                        f"{self.headers.get('Authorization')}"}})
                return self.send(500, echo.encode())
            if behaviour == "400":
                return self.send(400, b'{"error": {"message": "Invalid image"}}')
            if behaviour == "401":
                return self.send(401, b'{"error": {"message": "Incorrect API key provided"}}')
            if behaviour == "wrong":
                wrong = [answer[1], answer[0]] + list(answer[2:])
                content = reply_text(puzzle_id, wrong, rows, cols)
            if behaviour == "truncated":
                content, finish = f"<think>Reasoning for {puzzle_id}: the top left piece", "length"
            message = {"role": "assistant", "content": content}
            if behaviour in ("reasoning_content", "reasoning"):  # transformers serve / DeepSeek; vLLM >= 0.11
                think, rest = content.split("</think>")
                message = {"role": "assistant", "content": rest, behaviour: think.replace("<think>", "")}
                if behaviour == "reasoning":
                    message["reasoning_content"] = None
            reply = {"id": "chatcmpl-1", "object": "chat.completion", "model": body["model"],
                     "choices": [{"index": 0, "message": message, "finish_reason": finish}],
                     "usage": {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120}}
            self.send(200, json.dumps(reply).encode())
            with api.lock:
                api.sent.append(puzzle_id)

    return Handler


@pytest.fixture(scope="module")
def puzzles(jigsaw_data):
    rows = common.load_rows(str(jigsaw_data), "train")
    table = {}
    for row in rows:
        url = teacher.image_data_url(common.row_images(row)[0])
        table[url] = (row["id"], list(row["answer"]), int(row["rows"]), int(row["cols"]))
    assert len(table) == len(rows)  # every puzzle has its own image: the server can tell them apart
    return table


@pytest.fixture
def api(puzzles, monkeypatch):
    fake = FakeAPI(puzzles)
    server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(fake))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    fake.url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    # Fast retries for the tests (the real backoff starts at 1 s); the key only in the environment.
    monkeypatch.setattr(teacher, "BACKOFF_BASE_S", 0.01)
    monkeypatch.setattr(teacher, "BACKOFF_MAX_S", 0.05)
    monkeypatch.setenv(KEY_ENV, KEY)
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    yield fake
    fake.release.set()
    server.shutdown()
    server.server_close()


def train_ids(jigsaw_data, n):
    return list(common.load_rows(str(jigsaw_data), "train")["id"][:n])


def run(api, data, out, *extra):
    return rollout_sft.main(["--source", "rea_external", "--data", str(data), OUT, str(out),
                             "--teacher_url", api.url, "--teacher_model", "teacher-test",
                             "--teacher_api_key_env", KEY_ENV, "--teacher_timeout_s", "0.3", *extra])


def completions(out):
    rows = common.load_rows(str(out), "train", required=("prompt", "completion"))
    return dict(zip(rows["id"], rows["completion"]))


def assert_key_absent(root: Path, captured: str):
    assert KEY not in captured
    files = [p for p in root.rglob("*") if p.is_file()]
    assert files
    for path in files:
        assert KEY.encode() not in path.read_bytes(), f"the API key was written to {path}"


# ---------------------------------------------------------------------------------------------------------
# Against the server
# ---------------------------------------------------------------------------------------------------------
def test_every_fault_is_counted_and_a_rerun_asks_only_for_the_rest(api, jigsaw_data, tmp_path, capsys):
    ids = train_ids(jigsaw_data, 12)
    api.script = {ids[1]: ["malformed"], ids[2]: ["wrong"], ids[3]: ["429"], ids[4]: ["429_retry_after"],
                  ids[5]: ["500"], ids[6]: ["slow"], ids[7]: ["drop"], ids[8]: ["drop", "drop", "500"],
                  ids[9]: ["truncated"], ids[10]: ["429_retry_after_ms"], ids[11]: ["400"]}
    out = tmp_path / "rea_external"
    stats = run(api, jigsaw_data, out, "--limit", "12", "--teacher_max_retries", "2", "--teacher_concurrency", "4")

    # every fault counted; ids[8] (3 failures = 1 try + 2 retries) given up, ids[11] (HTTP 400) rejected
    assert stats["teacher_run_malformed_replies"] == 1
    assert stats["teacher_run_http_429"] == 3
    assert stats["teacher_run_http_5xx"] == 1 + 1
    assert stats["teacher_run_timeouts"] == 1
    assert stats["teacher_run_connection_errors"] == 1 + 2
    assert stats["teacher_run_gave_up"] == 1 and stats["teacher_run_rejected"] == 1
    assert stats["teacher_run_requests"] == len(api.requests) == 12 + 7 + 2
    assert stats["teacher_run_retries"] == 7 + 2
    assert stats["teacher_answered"] == 10 and stats["teacher_not_answered"] == 2
    assert (stats["teacher_ok"], stats["teacher_wrong_answer"], stats["teacher_no_answer"]) == (8, 1, 1)
    assert stats["teacher_truncated"] == 1
    # tokens from the replies' usage (answered puzzles only), cost at the given prices
    assert stats["teacher_prompt_tokens"] == 1000 and stats["teacher_completion_tokens"] == 200
    assert stats["teacher_cost_usd_estimate"] == pytest.approx(1000 / 1e6 * 2.5 + 200 / 1e6 * 10.0)
    # Retry-After: 1 was honoured (the second request for ids[4] came at least a second after the first)
    times = [t for t, puzzle_id, _ in api.requests if puzzle_id == ids[4]]
    assert len(times) == 2 and times[1] - times[0] >= 0.95

    # the data set: the 8 correct traces, each the teacher's reasoning + the true answer; the wrong answer and
    # the truncated reply are dropped (in the shard, counted), the failed puzzles have no row
    kept = completions(out)
    ok_ids = [ids[i] for i in (0, 1, 3, 4, 5, 6, 7, 10)]
    assert sorted(kept) == sorted(ok_ids) and stats["rows_kept"] == 8
    rows = common.load_rows(str(jigsaw_data), "train")
    for puzzle_id, completion in kept.items():
        row = rows[rows["id"].index(puzzle_id)]
        assert f"Reasoning for {puzzle_id}:" in completion
        assert jigsaw.jigsaw_reward(completion, list(row["answer"]))["reward"] == 3.0
    saved = json.loads((out / "stats.json").read_text())
    assert saved["teacher_run_http_429"] == 3
    assert saved["teacher_cost_usd_estimate"] == stats["teacher_cost_usd_estimate"]
    assert saved["source_checkpoint"] == "teacher:teacher-test"
    shard = [json.loads(line) for line in (tmp_path / "rea_external.teacher.jsonl").read_text().splitlines()]
    assert len(shard) == 10 and {r["id"] for r in shard} == set(ids) - {ids[8], ids[11]}

    # rerun: only the two unanswered puzzles are asked for, once each; the earlier rows are unchanged
    api.requests.clear()
    stats2 = run(api, jigsaw_data, out, "--limit", "12", "--teacher_max_retries", "2")
    assert sorted(api.requested()) == sorted([ids[8], ids[11]])
    assert stats2["teacher_ok"] == 10 and stats2["teacher_run_requests"] == 2 and stats2["rows_kept"] == 10
    kept2 = completions(out)
    assert {k: kept2[k] for k in kept} == kept
    # a third run asks for nothing and gives the same data set
    api.requests.clear()
    run(api, jigsaw_data, out, "--limit", "12")
    assert api.requests == [] and completions(out) == kept2

    captured = capsys.readouterr()
    # the given-up puzzle is named with its last error, a 500 whose body echoed the key: redacted
    assert f"not answered: {ids[8]} (gave_up: HTTP 500" in captured.out and "Bearer [redacted]" in captured.out
    assert_key_absent(tmp_path, captured.out + captured.err)


def test_fatal_error_keeps_written_replies_and_resume_gives_the_same_data_set(api, jigsaw_data, tmp_path, capsys):
    ids = train_ids(jigsaw_data, 8)
    # ids 0-3 answered, then the server starts refusing the key (a revoked key mid-run)
    api.script = {puzzle_id: ["401"] for puzzle_id in ids[4:]}
    out = tmp_path / "resumed"
    with pytest.raises(SystemExit) as stop:
        run(api, jigsaw_data, out, "--limit", "8", "--teacher_concurrency", "1")
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "HTTP 401" in err and "rerun the same command to resume" in err
    shard_path = tmp_path / "resumed.teacher.jsonl"
    assert [json.loads(line)["id"] for line in shard_path.read_text().splitlines()] == ids[:4]
    assert not out.exists()  # no data set from an aborted run

    # a crash in the middle of a write leaves a torn last line (here all but its newline, so it even parses):
    # dropped, that puzzle asked again, and the next append starts on a line of its own
    lines = shard_path.read_text().splitlines(keepends=True)
    shard_path.write_text("".join(lines[:3]) + lines[3].rstrip("\n"))
    api.requests.clear()
    api.script = {}
    run(api, jigsaw_data, out, "--limit", "8", "--teacher_concurrency", "3")
    assert sorted(api.requested()) == sorted(ids[3:])  # 0-2 kept from the first run, never asked again

    fresh = tmp_path / "fresh"
    run(api, jigsaw_data, fresh, "--limit", "8")
    assert completions(out) == completions(fresh)  # same rows as an uninterrupted run
    captured = capsys.readouterr()
    assert_key_absent(tmp_path, captured.out + captured.err + err)


def test_other_settings_do_not_resume_and_bad_flags_fail_before_any_request(api, jigsaw_data, tmp_path, capsys,
                                                                             monkeypatch):
    out = tmp_path / "rea_external"
    run(api, jigsaw_data, out, "--limit", "2")
    assert len(api.requests) == 2
    api.requests.clear()
    with pytest.raises(SystemExit):  # another token cap would mix two teachers' traces in one data set
        run(api, jigsaw_data, out, "--limit", "2", "--max_completion_length", "64")
    assert "other teacher settings" in capsys.readouterr().err

    base = ["--source", "rea_external", "--data", str(jigsaw_data), OUT, str(tmp_path / "x"), "--limit", "2"]
    cases = [
        (["--teacher_url", api.url], "needs --teacher_model"),
        (["--teacher_url", api.url, "--teacher_model", "m", "--traces", "t.jsonl"], "choose one"),
        (["--teacher_url", "ftp://example.org", "--teacher_model", "m"], "not an http(s) URL"),
        (["--teacher_url", f"http://user:{KEY}@127.0.0.1:9/v1", "--teacher_model", "m"], "user name or password"),
        (["--teacher_url", api.url, "--teacher_model", "m", "--teacher_concurrency", "0"], "--teacher_concurrency"),
        (["--teacher_url", "https://api.openai.com/v1", "--teacher_model", "gpt-4o",
          "--teacher_api_key_env", "KIT_TEST_UNSET_KEY"], "$KIT_TEST_UNSET_KEY is not set"),
    ]
    monkeypatch.delenv("KIT_TEST_UNSET_KEY", raising=False)
    for extra, message in cases:
        with pytest.raises(SystemExit):
            rollout_sft.main(base + extra)
        err = capsys.readouterr().err
        assert message in err, (extra, err)
        assert KEY not in err
    with pytest.raises(SystemExit):
        rollout_sft.main(["--source", "non_rea", "--data", str(jigsaw_data), OUT, str(tmp_path / "y"),
                          "--teacher_url", api.url, "--teacher_model", "m"])
    assert "only applies to --source rea_external" in capsys.readouterr().err
    assert api.requests == []  # none of these sent a request


def test_wrong_key_stops_the_run_with_nothing_written_but_the_settings(api, jigsaw_data, tmp_path, capsys,
                                                                       monkeypatch):
    monkeypatch.setenv(KEY_ENV, "sk-wrong-key-0000")
    with pytest.raises(SystemExit):
        run(api, jigsaw_data, tmp_path / "out", "--limit", "4", "--teacher_concurrency", "2")
    err = capsys.readouterr().err
    assert "HTTP 401" in err and "Incorrect API key" in err and "sk-wrong-key-0000" not in err
    assert len(api.requests) == 0  # refused before a puzzle was looked at (the server checks the key first)
    assert not (tmp_path / "out.teacher.jsonl").exists() or (tmp_path / "out.teacher.jsonl").read_text() == ""

    # a redirect is refused (it would send the Authorization header to another URL), not followed
    monkeypatch.setenv(KEY_ENV, KEY)
    with pytest.raises(SystemExit):
        rollout_sft.main(["--source", "rea_external", "--data", str(jigsaw_data), OUT, str(tmp_path / "moved"),
                          "--limit", "2", "--teacher_url", api.url.replace("/v1", "/moved/v1"),
                          "--teacher_model", "teacher-test", "--teacher_api_key_env", KEY_ENV])
    assert "HTTP 307" in capsys.readouterr().err and api.requests == []


def shard_records(tmp_path, name):
    return [json.loads(line) for line in (tmp_path / f"{name}.teacher.jsonl").read_text().splitlines()]


def test_reasoning_in_a_separate_field_is_read_stored_raw_and_rebuilt(api, jigsaw_data, tmp_path, capsys):
    ids = train_ids(jigsaw_data, 4)
    # transformers serve / DeepSeek send reasoning_content, vLLM >= 0.11 reasoning; ids[3] has it in the content
    api.script = {ids[0]: ["reasoning_content"], ids[1]: ["reasoning"], ids[2]: ["reasoning_content"]}
    out = tmp_path / "split"
    stats = run(api, jigsaw_data, out, "--limit", "4")
    assert stats["teacher_ok"] == 4 and stats["teacher_no_think"] == 0 and stats["rows_kept"] == 4
    kept = completions(out)
    for puzzle_id in ids:
        assert f"Reasoning for {puzzle_id}:" in kept[puzzle_id]
    records = {r["id"]: r for r in shard_records(tmp_path, "split")}
    # the raw fields as the server sent them
    assert records[ids[0]]["content"].strip().startswith("<answer>") and "<think>" not in records[ids[0]]["content"]
    assert records[ids[0]]["reasoning_content"].startswith(f"Reasoning for {ids[0]}:")
    assert records[ids[1]]["reasoning_content"].startswith(f"Reasoning for {ids[1]}:")  # read from "reasoning"
    assert records[ids[3]]["reasoning_content"] is None and "<think>" in records[ids[3]]["content"]

    # a rerun rebuilds every record from its raw fields (here: verdicts spoilt by hand), asking nothing
    shard = tmp_path / "split.teacher.jsonl"
    shard.write_text("".join(json.dumps({**r, "status": "no_think", "reasoning": None}) + "\n"
                             for r in records.values()))
    api.requests.clear()
    stats = run(api, jigsaw_data, out, "--limit", "4", "--overwrite")
    assert api.requests == [] and stats["teacher_ok"] == 4 and completions(out) == kept
    capsys.readouterr()


def test_an_old_shard_that_dropped_the_reasoning_field_is_asked_again(api, jigsaw_data, tmp_path, capsys):
    """Shards of the older teacher.py stored only message.content: against a server that sends the reasoning in
    reasoning_content, every right answer was recorded as no_think (or, all in the reasoning, as empty)."""
    ids = train_ids(jigsaw_data, 4)
    rows = common.load_rows(str(jigsaw_data), "train")
    grid = {r["id"]: jigsaw.answer_text(list(r["answer"]), int(r["rows"]), int(r["cols"])) for r in rows}
    old = [  # the older format: no reasoning_content key
        {"id": ids[0], "status": "ok", "reasoning": "old reasoning", "attempts": 1, "finish_reason": "stop",
         "content": f"<think>old reasoning</think><answer>\n{grid[ids[0]]}\n</answer>", "prompt_tokens": 100,
         "completion_tokens": 20},
        {"id": ids[1], "status": "no_think", "reasoning": None, "content": f"<answer>\n{grid[ids[1]]}\n</answer>",
         "finish_reason": "stop", "prompt_tokens": 100, "completion_tokens": 20, "attempts": 1},
        {"id": ids[2], "status": "no_answer", "reasoning": None, "content": "", "finish_reason": "length",
         "prompt_tokens": 100, "completion_tokens": 512, "attempts": 1},
    ]
    out = tmp_path / "old"
    run(api, jigsaw_data, tmp_path / "meta_only", "--limit", "4")  # the settings file, as the old run wrote it
    (tmp_path / "old.teacher.json").write_text((tmp_path / "meta_only.teacher.json").read_text())
    (tmp_path / "old.teacher.jsonl").write_text("".join(json.dumps(r) + "\n" for r in old))
    api.requests.clear()
    api.default = "reasoning_content"
    stats = run(api, jigsaw_data, out, "--limit", "4")
    assert sorted(api.requested()) == sorted(ids[1:])  # ids[0] kept as it was; the two unreadable ones asked again
    assert stats["teacher_ok"] == 4 and stats["teacher_run_old_records_asked_again"] == 2
    assert "old reasoning" in completions(out)[ids[0]]
    assert "2 replies in" in capsys.readouterr().out


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_a_wrong_url_stops_the_run_at_once_naming_the_flag(api, jigsaw_data, tmp_path, capsys, monkeypatch):
    # the real backoff (1 s doubling): without the early stop this was ~190 s per puzzle
    monkeypatch.setattr(teacher, "BACKOFF_BASE_S", 1.0)
    monkeypatch.setattr(teacher, "BACKOFF_MAX_S", 60.0)
    # bounds far below the old ~190 s per puzzle, loose enough for a loaded machine (free: 0.02 s and 2.6 s;
    # concurrency 1 waits 1 + 2 s of backoff between the 3 failures)
    for concurrency, bound_s in (("8", 20.0), ("1", 30.0)):
        started = time.monotonic()
        with pytest.raises(SystemExit):
            rollout_sft.main(["--source", "rea_external", "--data", str(jigsaw_data), OUT, str(tmp_path / "o"),
                              "--limit", "16", "--teacher_url", f"http://127.0.0.1:{free_port()}/v1",
                              "--teacher_model", "teacher-test", "--teacher_api_key_env", KEY_ENV,
                              "--teacher_concurrency", concurrency])
        elapsed = time.monotonic() - started
        err = capsys.readouterr().err
        assert err.startswith("error: teacher: the first 3 requests") and "could not connect" in err
        assert "Check --teacher_url" in err and "ConnectionRefusedError" in err
        assert elapsed < bound_s, elapsed


@pytest.mark.parametrize("behaviour, requests, message", [
    ("500_plain", 3, "HTTP 500 (Internal Server Error). Some servers answer an unknown model name with HTTP 500"),
    ("500_model", 3, "could not load model teacher-test): the server's error names the model"),
    ("404_model", 1, "does not serve --teacher_model 'teacher-test'"),
])
def test_an_unknown_model_stops_the_run_as_a_model_problem(api, jigsaw_data, tmp_path, capsys, behaviour, requests,
                                                           message):
    api.default = behaviour
    with pytest.raises(SystemExit):
        run(api, jigsaw_data, tmp_path / "o", "--limit", "16", "--teacher_concurrency", "1")
    err = capsys.readouterr().err
    assert message in err and "--teacher_model" in err, err
    assert len(api.requests) == requests  # 3 failures in a row before any reply (EARLY_STOP_FAILURES); 404 at once


def test_a_server_that_never_answers_stops_the_run_early(api, jigsaw_data, tmp_path, capsys):
    api.default = "hang"
    started = time.monotonic()
    with pytest.raises(SystemExit):
        run(api, jigsaw_data, tmp_path / "o", "--limit", "16", "--teacher_concurrency", "2")  # timeout 0.3 s
    elapsed = time.monotonic() - started
    err = capsys.readouterr().err
    assert "no reply within --teacher_timeout_s 0.3" in err and "raise --teacher_timeout_s" in err
    assert len(api.requests) <= 4 and elapsed < 20, (len(api.requests), elapsed)  # free machine: ~1 s


def test_timeouts_bound_each_request_and_a_serial_server_lowers_the_requests_in_flight(api, jigsaw_data, tmp_path):
    ids = train_ids(jigsaw_data, 8)
    # a reply whose bytes keep coming (3 s in all) is cut at the deadline (a per-byte timeout never fired)
    api.script = {ids[0]: ["trickle"]}
    started = time.monotonic()
    stats = run(api, jigsaw_data, tmp_path / "trickle", "--limit", "2")
    assert stats["teacher_run_timeouts"] == 1 and stats["teacher_ok"] == 2 and time.monotonic() - started < 2.5

    # one request at a time, 0.25 s each: with 4 sent at once the 3rd and 4th wait past the 0.6 s timeout in the
    # server's queue; the client halves what it keeps in flight, and every puzzle is answered
    api.script, api.default, api.slow_s, api.one_at_a_time = {}, "slow", 0.25, True
    stats = run(api, jigsaw_data, tmp_path / "serial", "--limit", "8", "--teacher_concurrency", "4",
                "--teacher_timeout_s", "0.6")
    assert stats["teacher_ok"] == 8 and stats["teacher_run_timeouts"] >= 1
    assert stats["teacher_run_in_flight_lowered"] >= 1 and stats["teacher_run_in_flight_limit"] < 4


def test_ctrl_c_keeps_the_replies_that_arrived_and_does_not_wait_for_the_rest(api, jigsaw_data, tmp_path):
    ids = train_ids(jigsaw_data, 8)
    api.script = {puzzle_id: ["hang"] for puzzle_id in ids[3:]}  # 0-2 answered, then 4 requests that hang
    out = tmp_path / "interrupted"
    env = {**os.environ, KEY_ENV: KEY, "OMP_NUM_THREADS": "1"}
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        env.pop(name, None)
    command = [sys.executable, str(ROOT / "rollout_sft.py"), "--source", "rea_external", "--data", str(jigsaw_data),
               OUT, str(out), "--limit", "8", "--teacher_url", api.url, "--teacher_model", "teacher-test",
               "--teacher_api_key_env", KEY_ENV, "--teacher_concurrency", "4", "--teacher_timeout_s", "300"]
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (len(api.sent) == 3 and len(api.requests) == 7) and time.monotonic() < deadline:
            assert process.poll() is None, process.stdout.read()
            time.sleep(0.05)
        assert sorted(api.sent) == sorted(ids[:3]) and len(api.requests) == 7  # 4 requests in flight, hanging
        interrupted = time.monotonic()
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=30)
        stop_s = time.monotonic() - interrupted
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    print(f"SIGINT to exit: {stop_s:.2f} s")
    # far below the 300 s request timeout it used to wait for (1.2 s on a free machine; a loaded one is slower)
    assert process.returncode != 0 and stop_s < 60, (process.returncode, stop_s)
    assert "stopped: 4 request(s) in flight cancelled" in output, output
    assert sorted(r["id"] for r in shard_records(tmp_path, "interrupted")) == sorted(ids[:3])
    assert KEY not in output


# ---------------------------------------------------------------------------------------------------------
# Against a real OpenAI-compatible server: `transformers serve` (transformers' [serving] extra,
# requirements-dev.txt) serving the tiny random Qwen2.5-VL on 127.0.0.1
# ---------------------------------------------------------------------------------------------------------
SERVE_START_S = 120  # the server answers GET /health within this, or the test fails (measured: ~10-20 s)
REAL_REASONING = "sky on top"


@pytest.fixture(scope="module")
def real_server(toy_model_dir, jigsaw_data, tmp_path_factory):
    """`transformers serve` in its own process group, killed (the whole group) at teardown whatever happens.
    A random model writes noise, so the model folder's generation_config carries a sequence_bias that makes
    greedy decoding write one script after the assistant prompt, "<think>sky on top</think>" and the answer of
    the first training puzzle, on the server's real path (chat template, image processor, Qwen's response parser
    that moves <think> into reasoning_content)."""
    pytest.importorskip("uvicorn", reason="transformers serve needs transformers[serving]: "
                                          "pip install -r requirements-dev.txt")
    from transformers import AutoTokenizer
    folder = tmp_path_factory.mktemp("served") / "toy-qwen2.5-vl"
    shutil.copytree(toy_model_dir, folder)
    first = common.load_rows(str(jigsaw_data), "train")[0]
    grid = jigsaw.answer_text(list(first["answer"]), int(first["rows"]), int(first["cols"]))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    script = tokenizer.encode(f"<think>{REAL_REASONING}</think>\n<answer>\n{grid}\n</answer>",
                              add_special_tokens=False) + [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    prompt_end = tokenizer.encode("<|im_start|>assistant\n", add_special_tokens=False)
    # token i of the script gets +100 when everything before it matches: bigrams would loop on repeated tokens
    config = json.loads((folder / "generation_config.json").read_text())
    config["sequence_bias"] = [[prompt_end + script[:i + 1], 100.0] for i in range(len(script))]
    (folder / "generation_config.json").write_text(json.dumps(config))

    port = free_port()
    log_path = folder.parent / "serve.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_HOME": str(folder.parent / "hf_home")}
    started = time.monotonic()
    with open(log_path, "wb") as log_file:
        server = subprocess.Popen([sys.executable, "-m", "transformers.cli.transformers", "serve", "--host",
                                   "127.0.0.1", "--port", str(port), "--device", "cpu"],
                                  stdout=log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as health:
                    if health.status == 200:
                        break
            except OSError:
                pass
            tail = log_path.read_text(errors="replace")[-3000:]
            assert server.poll() is None, f"transformers serve exited ({server.returncode}):\n{tail}"
            assert time.monotonic() - started < SERVE_START_S, \
                f"transformers serve not up in {SERVE_START_S} s:\n{tail}"
            time.sleep(0.2)
        # Load the model now (it loads on its first request), so that GET /v1/models lists it in every test.
        warm_up = json.dumps({"model": str(folder), "max_tokens": 1,
                              "messages": [{"role": "user", "content": "hi"}]}).encode()
        urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=warm_up,
                                                      headers={"Content-Type": "application/json"}),
                               timeout=SERVE_START_S).close()
        print(f"transformers serve up and the model loaded in {time.monotonic() - started:.1f} s")
        yield SimpleNamespace(url=f"http://127.0.0.1:{port}/v1", model=str(folder), answer=list(first["answer"]),
                              log=log_path)
    finally:
        for sig, wait_s in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
            try:
                os.killpg(server.pid, sig)  # the whole group: uvicorn's workers too
            except ProcessLookupError:
                break
            try:
                server.wait(timeout=wait_s)
                break
            except subprocess.TimeoutExpired:
                continue


def test_real_server_reasoning_content_is_read_and_rows_are_kept(real_server, jigsaw_data, tmp_path, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    rows = common.load_rows(str(jigsaw_data), "train").select(range(4))
    same = [r["id"] for r in rows if list(r["answer"]) == real_server.answer]  # the script's answer is theirs
    out = tmp_path / "real"
    stats = rollout_sft.main(["--source", "rea_external", "--data", str(jigsaw_data), OUT, str(out), "--limit", "4",
                              "--teacher_url", real_server.url, "--teacher_model", real_server.model,
                              "--teacher_api_key_env", KEY_ENV, "--teacher_concurrency", "2",
                              "--teacher_timeout_s", "120", "--max_completion_length", "48",
                              "--teacher_prompt_price", "0", "--teacher_completion_price", "0"])
    # every request answered (the first one loads the model), no retries; the server's usage counted
    assert stats["teacher_run_requests"] == 4 and stats["teacher_answered"] == 4
    assert stats["teacher_prompt_tokens"] > 4 * 16 and stats["teacher_completion_tokens"] > 0
    # the reasoning came in reasoning_content (the content holds only the answer) and was read
    assert (stats["teacher_ok"], stats["teacher_wrong_answer"], stats["rows_kept"]) == (len(same), 4 - len(same),
                                                                                        len(same))
    records = shard_records(tmp_path, "real")
    assert sorted(r["id"] for r in records) == sorted(rows["id"])
    for record in records:
        assert record["reasoning_content"] == REAL_REASONING and "<think>" not in record["content"]
        assert record["content"].strip().startswith("<answer>") and record["finish_reason"] == "stop"
    for completion in completions(out).values():
        assert REAL_REASONING in completion


def test_real_server_unknown_model_stops_the_run_early(real_server, jigsaw_data, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    started = time.monotonic()
    with pytest.raises(SystemExit):
        rollout_sft.main(["--source", "rea_external", "--data", str(jigsaw_data), OUT, str(tmp_path / "o"),
                          "--limit", "16", "--teacher_url", real_server.url, "--teacher_model", "no-such/model",
                          "--teacher_api_key_env", KEY_ENV, "--teacher_concurrency", "2"])
    elapsed = time.monotonic() - started
    err = capsys.readouterr().err
    assert "HTTP 500" in err and "check --teacher_model 'no-such/model'" in err, err
    assert f"(the server lists: {real_server.model!r})" in err  # GET /v1/models, to pick the right name
    assert elapsed < 60, elapsed  # backoff 1 + 2 s between the 3 failures (0.85 s free; was 205 s per puzzle)


def test_read_shard_drops_a_line_cut_mid_record(tmp_path):
    shard = tmp_path / "x.teacher.jsonl"
    files.append_shard(shard, [{"id": "a", "status": "ok"}])
    files.append_shard(shard, [{"id": "b", "status": "ok"}])
    shard.write_text(shard.read_text()[:-9])  # the write of "b" cut short
    assert list(files.read_shard(shard)) == ["a"]
    files.append_shard(shard, [{"id": "c", "status": "ok"}])
    assert list(files.read_shard(shard)) == ["a", "c"]


# ---------------------------------------------------------------------------------------------------------
# Pure pieces, by hand
# ---------------------------------------------------------------------------------------------------------
def test_parse_reply_accepts_chat_completions_and_rejects_the_rest():
    good = {"choices": [{"message": {"content": "<think>a</think><answer>1 2</answer>"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 7, "completion_tokens": 3}}
    assert teacher.parse_reply(json.dumps(good).encode()) == {
        "content": "<think>a</think><answer>1 2</answer>", "reasoning_content": None, "finish_reason": "stop",
        "prompt_tokens": 7, "completion_tokens": 3}
    # reasoning in a field of its own (transformers serve, DeepSeek: reasoning_content; vLLM: reasoning)
    for field in ("reasoning_content", "reasoning"):
        split = {"choices": [{"message": {"content": "<answer>1 2</answer>", field: "a"}}]}
        reply = teacher.parse_reply(json.dumps(split).encode())
        assert (reply["content"], reply["reasoning_content"]) == ("<answer>1 2</answer>", "a")
        assert teacher.full_text(reply["content"], reply["reasoning_content"]) == "<think>a</think><answer>1 2</answer>"
    both = {"choices": [{"message": {"content": None, "reasoning_content": "", "reasoning": "b"}}]}
    assert teacher.parse_reply(json.dumps(both).encode())["reasoning_content"] == "b"  # the first non-empty one
    assert teacher.parse_reply(json.dumps(both).encode())["content"] == ""
    assert teacher.full_text("<answer>1</answer>", None) == "<answer>1</answer>"
    parts = {"choices": [{"message": {"content": [{"type": "text", "text": "x"}, {"type": "text", "text": "y"}]}}]}
    assert teacher.parse_reply(json.dumps(parts).encode())["content"] == "xy"
    assert teacher.parse_reply(json.dumps(parts).encode())["prompt_tokens"] is None  # no usage sent
    for body in (b'{"choices": [', b"\xff\xfe", b"[1, 2]", b'{"choices": []}', b'{"error": {"message": "busy"}}',
                 b'{"choices": [{"message": {"content": null}}]}', b'{"choices": ["text"]}'):
        with pytest.raises(teacher.MalformedReply):
            teacher.parse_reply(body)


def test_judge_keeps_only_the_true_answer_with_reasoning():
    answer = [3, 1, 4, 2]
    assert teacher.judge("<think> blue sky on top </think><answer>3 1\n4 2</answer>", answer) == \
        ("ok", "blue sky on top")
    assert teacher.judge("<think>x</think><answer>3 1\n2 4</answer>", answer) == ("wrong_answer", None)
    assert teacher.judge("The answer is 3 1 4 2.", answer) == ("no_answer", None)
    assert teacher.judge("<think>x</think><answer>__import__('os')</answer>", answer) == ("no_answer", None)
    assert teacher.judge("<answer>3 1\n4 2</answer>", answer) == ("no_think", None)
    assert teacher.judge("<think>  </think><answer>3 1\n4 2</answer>", answer) == ("no_think", None)


def test_retry_after_and_backoff(monkeypatch):
    assert teacher.parse_retry_after({"retry-after": "2"}) == 2.0
    assert teacher.parse_retry_after({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    assert teacher.parse_retry_after({"retry-after": "soon"}) is None
    assert teacher.parse_retry_after({}) is None
    later = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 25 <= teacher.parse_retry_after({"retry-after": later}) <= 31
    monkeypatch.setattr(teacher, "BACKOFF_BASE_S", 1.0)
    monkeypatch.setattr(teacher, "BACKOFF_MAX_S", 60.0)
    rng = random.Random(0)
    for attempt, ceiling in [(0, 1), (1, 2), (2, 4), (5, 32), (6, 60), (12, 60)]:
        delays = [teacher.retry_delay(attempt, None, rng) for _ in range(50)]
        assert all(0.75 * ceiling <= d <= ceiling for d in delays)
        assert max(delays) - min(delays) > 0.05 * ceiling  # jittered, not lockstep
    assert teacher.retry_delay(3, 5.0) == 5.0  # the server's Retry-After wins over backoff
    assert teacher.retry_delay(0, 1e6) == teacher.RETRY_AFTER_MAX_S


def test_cost_urls_redaction_and_prompt():
    assert teacher.cost_usd(1_200_000, 300_000, 2.5, 10.0) == pytest.approx(6.0)
    assert teacher.endpoint("http://h:8000/v1/") == "http://h:8000/v1/chat/completions"
    assert teacher.endpoint("http://h/v1/chat/completions") == "http://h/v1/chat/completions"
    assert teacher.public_url("https://u:secret@h.example:8443/v1?key=abc#x") == "https://h.example:8443/v1"
    assert teacher.redact(f"Authorization: Bearer {KEY}", KEY) == "Authorization: Bearer [redacted]"
    from PIL import Image
    messages = teacher.build_messages("QUESTION", [Image.new("RGB", (8, 8))], [3, 1, 4, 2], 2, 2)
    assert messages[0]["role"] == "system" and "<think>" in messages[0]["content"]
    image, text = messages[1]["content"]
    assert image["image_url"]["url"].startswith("data:image/png;base64,")
    assert "QUESTION" in text["text"] and "3 1\n4 2" in text["text"]
