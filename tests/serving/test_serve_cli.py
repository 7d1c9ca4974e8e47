"""`orchmoe serve` as a real process: SIGTERM drains and exits 0; several PEFT LoRAs served by name; route-only
mode forwarding to that second server on loopback; the command's errors."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
import torch

from orchmoe.adapters.bundle import BundleManifest, lora_name
from orchmoe.cli import main
from orchmoe.loading.pretrained import load_model_and_tokenizer
from orchmoe.serving.server import ServeOptions, build_app
from serving_helpers import serving


class ServeProcess:
    """``python -m orchmoe serve ARGS --port 0`` in a subprocess; `url` once it listens."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "orchmoe", "serve", *args, "--port", "0"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        self.url = None
        for line in self.proc.stdout:
            found = re.search(r" on (http://\S+)", line)
            if found:
                self.url = found.group(1)
                break
        if self.url is None:
            raise AssertionError(f"orchmoe serve did not start: {self.proc.wait(30)} {self.proc.stderr.read()[-2000:]}")

    def __enter__(self) -> ServeProcess:
        return self

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)


def test_sigterm_finishes_in_flight_work_refuses_new_and_exits_0(runs):
    with ServeProcess(str(runs["orchmoe"])) as server:
        got: dict = {}

        def stream() -> None:
            body = {"prompt": "Maria works as a teacher", "max_tokens": 400, "stream": True}
            with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as resp:
                got["lines"] = [line for line in resp.iter_lines() if line]

        t = threading.Thread(target=stream)
        t.start()
        deadline = time.time() + 30
        while httpx.get(server.url + "/health").json()["running"] == 0:
            assert time.time() < deadline
            time.sleep(0.01)
        server.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        with pytest.raises(httpx.TransportError):  # no longer accepting
            httpx.get(server.url + "/health", timeout=2)
        t.join(60)
        assert server.proc.wait(60) == 0
        assert got["lines"][-1] == "data: [DONE]"
        finish = json.loads(got["lines"][-2][6:])["choices"][0]["finish_reason"]
        assert finish in ("stop", "length")  # the stream ran to its end, not cut by the shutdown
        assert "stopped" in server.proc.stdout.read()


def test_route_only_forwards_to_a_multi_lora_orchmoe_serve(runs, tiny_llama, tmp_path, task_requests):
    """The OrchMoE adapter's abstract tasks exported as PEFT LoRAs, served by a second `orchmoe serve --lora`;
    the router answers each request with the upstream LoRA of argmax pi, exactly as asking it directly does."""
    from orchmoe import load_adapter

    base, _, info = load_model_and_tokenizer(str(tiny_llama))
    routed = load_adapter(base, runs["orchmoe"] / "adapter", base_model_name=info["name"])
    K = routed.adapter_config.n_abstract_tasks
    loras = []
    for k in range(K):
        routed.export_peft_lora(tmp_path / lora_name(abstract_task=k), abstract_task=k)
        loras += ["--lora", f"{lora_name(abstract_task=k)}={tmp_path / lora_name(abstract_task=k)}"]
    with ServeProcess(*loras, "--model", str(tiny_llama)) as upstream:
        ids = {m["id"] for m in httpx.get(upstream.url + "/v1/models").json()["data"]}
        assert {lora_name(abstract_task=k) for k in range(K)} <= ids
        app, served = build_app(ServeOptions(path=str(runs["orchmoe"]), route_to=upstream.url))
        with serving(app) as url:
            seen = set()
            for r in task_requests:
                body = {k: r[k] for k in ("definition", "input", "examples")}
                got = httpx.post(url + "/v1/completions", json={**body, "max_tokens": 6}, timeout=60)
                assert got.status_code == 200, got.text
                prompt = served.prompt_format.encode(served.tokenizer, r["definition"], r["input"], r["examples"])
                with torch.inference_mode():
                    x = torch.tensor([prompt])
                    k = int(routed.task_probabilities(input_ids=x, attention_mask=torch.ones_like(x)).argmax())
                seen.add(k)
                direct = httpx.post(
                    upstream.url + "/v1/completions",
                    json={"model": lora_name(abstract_task=k), "prompt": prompt, "max_tokens": 6},
                )
                assert got.headers["x-orchmoe-route"] == lora_name(abstract_task=k)
                assert got.json()["choices"][0]["text"] == direct.json()["choices"][0]["text"]
                assert got.json()["usage"]["prompt_tokens"] == len(prompt)
            assert len(seen) >= 2  # the prompts of different tasks went to different LoRAs
            streamed = httpx.post(url + "/v1/completions", json={**body, "max_tokens": 6, "stream": True}, timeout=60)
            assert streamed.text.rstrip().endswith("data: [DONE]")
            chunks = [json.loads(line[6:]) for line in streamed.text.splitlines() if line.startswith("data: {")]
            assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == got.json()["choices"][0]["text"]
        bad = httpx.post(upstream.url + "/v1/completions", json={"model": "abstract-99", "prompt": "x"})
        assert bad.status_code == 404 and "abstract-0" in bad.json()["error"]["message"]


def test_serve_command_errors_are_one_line(tmp_path, capsys):
    assert main(["serve", str(tmp_path / "nowhere"), "--port", "0"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["serve", "--port", "0"]) == 2
    assert "give the run folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["serve", "--lora", "no-equals-sign"])
    assert "NAME=PATH" in capsys.readouterr().err


def test_a_hard_to_reach_upstream_is_a_502(runs):
    app, _ = build_app(ServeOptions(path=str(runs["orchmoe"]), route_to="http://127.0.0.1:9"))
    with serving(app) as url:
        resp = httpx.post(url + "/v1/completions", json={"prompt": "abc"})
    assert resp.status_code == 502 and "cannot be reached" in resp.json()["error"]["message"]


def test_a_bundle_is_served_by_name_and_maps_the_routing(runs, tiny_llama, tmp_path, references):
    """An `orchmoe export --bundle` folder (its manifest's layout): `--bundle` serves its LoRAs by name, and
    route-only mode sends an abstract task without a LoRA of its own where the manifest says."""
    from orchmoe.serving.route_only import route_of

    served = references["orchmoe"]
    (tmp_path / "loras").mkdir()
    served.model.export_peft_lora(tmp_path / "loras" / "abstract-0", abstract_task=0)
    K = served.model.adapter_config.n_abstract_tasks
    route = {"by": "prompt", "abstract_task_to_lora": {str(k): "abstract-0" for k in range(K)}}
    manifest = {"format": "orchmoe-lora-bundle", "method": "orchmoe",
                "loras": {"abstract-0": {"path": "loras/abstract-0"}}, "route": route}  # fmt: skip
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    bundle = BundleManifest.read(tmp_path)
    assert route_of(served, [5, 6, 7], None, bundle) == "abstract-0"
    app, lora_set = build_app(ServeOptions(bundle=str(tmp_path), model=str(tiny_llama)))
    with serving(app) as url:
        ids = [m["id"] for m in httpx.get(url + "/v1/models").json()["data"]]
        assert ids[0] == "abstract-0" and lora_set.method == "lora-set"
        assert httpx.post(url + "/v1/completions", json={"model": "abstract-0", "prompt": "abc"}).status_code == 200
    (tmp_path / "manifest.json").write_text("{}")
    with pytest.raises(ValueError, match="not an orchmoe LoRA bundle"):
        BundleManifest.read(tmp_path)
