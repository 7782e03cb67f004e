"""edgelora.entrypoints.ray without a cluster: options, the config file, the built application, the merged metrics, CLI errors.

Building an application only describes deployments (nothing starts), so these run in a second.
The one test that starts Ray (``edgelora serve --ray`` on a local instance of its own) is last.
"""

from __future__ import annotations

import importlib.util
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.parser import text_string_to_metric_families
from server_process import running_server

from edgelora.cli import main
from edgelora.entrypoints.server import ServeOptions
from edgelora.errors import UserInputError
from edgelora.formats.processed_adapter import ProcessedAdapterFiles

pytestmark = pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="needs the [ray] extra")
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def sample(exported_samples):
    return exported_samples["qwen2"]


def _deployments(app) -> dict:
    """Deployment name -> (deployment, init args) of a built application, walking the bound arguments."""
    from ray.serve.deployment import Application

    found = {}

    def walk(node) -> None:
        if isinstance(node, Application):
            bound = node._bound_deployment
            found[bound.name] = (bound, bound.init_args)
            for arg in bound.init_args:
                walk(arg)

    walk(app)
    return found


def test_config_file_builds_the_application(sample, tmp_path):
    """samples/ray_serve.yaml's args, pointed at the tiny sample: replicas, Ray's queue bound, adapters."""
    from edgelora.entrypoints.ray import app_builder

    config = yaml.safe_load((ROOT / "samples" / "ray_serve.yaml").read_text())
    (application,) = config["applications"]
    assert application["import_path"] == "edgelora.entrypoints.ray:app_builder"
    args = dict(application["args"])
    args["onnx_dir"] = str(sample.onnx_dir)
    args["lora_modules"] = {"a1": str(sample.processed["a1"]), "a2": str(sample.adapters["a2"])}  # PEFT: processed
    args["lora_cache_dir"] = str(tmp_path / "cache")
    deployments = _deployments(app_builder(args))
    assert set(deployments) == {"EdgeLoraIngress", "EdgeLoraReplica", "EdgeLoraHub"}
    replica, (settings, _) = deployments["EdgeLoraReplica"]
    assert replica.num_replicas == 2
    # rows + queue: Ray's router must never find a replica "full" while its scheduler has room
    assert replica.max_ongoing_requests == 8 + 8 * 8
    assert replica.ray_actor_options["num_cpus"] == 1 and "num_gpus" not in replica.ray_actor_options
    assert settings.engine.max_cpu_loras == 8 and settings.engine.max_loras == 4 and settings.adapters == {}
    _, (adapters,) = deployments["EdgeLoraHub"]  # name -> (folder, version): replicas load what was checked here
    assert set(adapters) == {"a1", "a2"} and Path(adapters["a2"][0]).parent == tmp_path / "cache"
    assert adapters["a1"][1] == ProcessedAdapterFiles.read(sample.processed["a1"]).version


def test_relative_paths_are_made_absolute_where_the_app_is_built(sample, monkeypatch):
    """Replicas run in other processes (other nodes, another cwd): they get absolute paths."""
    from edgelora.entrypoints.ray import app_builder

    monkeypatch.chdir(sample.onnx_dir.parent)
    relative = sample.processed["a1"].relative_to(sample.onnx_dir.parent)
    deployments = _deployments(app_builder({"onnx_dir": sample.onnx_dir.name, "lora_modules": [f"a1={relative}"]}))
    _, (settings, _) = deployments["EdgeLoraReplica"]
    _, (served, adapters, _, _) = deployments["EdgeLoraIngress"]
    assert settings.onnx_dir == sample.onnx_dir and served.onnx_dir.is_absolute()
    assert Path(adapters["a1"][0]) == sample.processed["a1"]


def test_cuda_replicas_ask_ray_for_a_gpu_each(sample):
    from edgelora.entrypoints.ray import RayOptions, build_app

    options = RayOptions(serve=ServeOptions(onnx_dir=sample.onnx_dir, device="cuda", threads=2), replicas=3)
    replica, _ = _deployments(build_app(options))["EdgeLoraReplica"]
    assert replica.ray_actor_options == {"num_cpus": 2, "num_gpus": 1}
    assert replica.num_replicas == 3


@pytest.mark.parametrize(("args", "message"), [
    ({"replicas": 2}, "onnx_dir is required"),
    ({"onnx_dir": "x", "max_lorass": 2}, "unknown args ['max_lorass']"),
    ({"onnx_dir": "x", "replicas": 0}, "--replicas 0"),
    ({"onnx_dir": "x", "lora_modules": 3}, "lora_modules must be"),
])
def test_config_args_are_checked(args, message):
    from edgelora.entrypoints.ray import RayOptions

    with pytest.raises(UserInputError, match=None) as caught:
        RayOptions.from_config(args)
    assert message in str(caught.value)


def test_build_refuses_what_no_replica_could_serve(sample, tmp_path):
    from edgelora.entrypoints.ray import RayOptions, build_app

    with pytest.raises(UserInputError, match="no lora_model.onnx"):
        build_app(RayOptions(serve=ServeOptions(onnx_dir=tmp_path)))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "processed_adapter_model.safetensors").write_bytes(b"not safetensors")
    (broken / "config.json").write_text("{}")
    with pytest.raises(UserInputError, match="--lora-modules bad"):
        build_app(RayOptions(serve=ServeOptions(onnx_dir=sample.onnx_dir, lora_modules={"bad": broken})))


def test_metrics_of_every_replica_are_labelled():
    from edgelora.entrypoints.ray.metrics import exposition, families_of

    reports = {}
    for replica, loads in (("r1", 3), ("r2", 5)):
        registry = CollectorRegistry()
        Counter("edgelora_replica_adapter_loads", "loads", registry=registry).inc(loads)
        Counter("edgelora_requests", "requests", ["adapter", "outcome"], registry=registry).labels("a", "stop").inc()
        reports[replica] = families_of(registry)
    ingress = CollectorRegistry()
    Counter("edgelora_requests", "requests", ["adapter", "outcome"], registry=ingress).labels("a", "rejected").inc(2)
    Counter("edgelora_generation_tokens", "not the ingress's to report", registry=ingress).inc()
    samples = [(sample.name, sample.labels, sample.value) for family in
               text_string_to_metric_families(exposition(reports, ingress).decode()) for sample in family.samples]
    loads = {labels["replica"]: value for name, labels, value in samples if name == "edgelora_replica_adapter_loads_total"}
    assert loads == {"r1": 3, "r2": 5}
    requests = {(labels["replica"], labels["outcome"]): value for name, labels, value in samples
                if name == "edgelora_requests_total"}
    assert requests == {("r1", "stop"): 1, ("r2", "stop"): 1, ("ingress", "rejected"): 2}
    assert ("edgelora_replicas", {}, 2.0) in samples
    assert not [s for s in samples if s[0].startswith("edgelora_generation_tokens")]


@pytest.mark.parametrize(("argv", "message"), [
    (["--replicas", "2"], "--replicas and --ray-address need --ray"),
    (["--ray", "--replicas", "0"], "--replicas 0"),
    (["--ray", "--lora-modules", "x=/nonexistent"], "--lora-modules x"),
])
def test_cli_errors_are_one_line_before_ray_starts(sample, capsys, argv, message):
    code = main(["serve", "--onnx-dir", str(sample.onnx_dir), "--port", "0", *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1, err


def test_cuda_on_a_cpu_only_build_fails_before_ray_starts(sample, capsys):
    from conftest import cuda_available

    if cuda_available():
        pytest.skip("this runtime has CUDA: the command would start serving")
    code = main(["serve", "--ray", "--device", "cuda", "--onnx-dir", str(sample.onnx_dir), "--port", "0"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "--device cuda" in err and len(err.splitlines()) == 1, err


def _one_replica(sample, *flags: str):
    """``edgelora serve --ray`` with one replica and its own local Ray instance (no --ray-address)."""
    return running_server("--ray", "--replicas", "1", *flags, "--onnx-dir", str(sample.onnx_dir),
                          "--served-model-name", "tiny", "--lora-modules", f"a1={sample.processed['a1']}",
                          f"a2={sample.processed['a2']}", timeout_s=300)


def _answers(url: str, api_key: str = "none") -> None:
    from openai import OpenAI

    client = OpenAI(base_url=f"{url}/v1", api_key=api_key, max_retries=0, timeout=60)
    answer = client.completions.create(model="a1", prompt="The quick brown fox", max_tokens=4, temperature=0)
    assert answer.usage.completion_tokens >= 1


def test_serve_ray_on_its_own_local_instance(sample, tmp_path):
    """No --ray-address: the command starts Ray itself (loopback), serves with the same keys as
    edgelora serve, and SIGTERM stops it all (exit 0).

    Room for one adapter (``--max-cpu-loras 1``: Ray's multiplexer holds one model), and requests
    on two at once: Ray evicts each adapter while its rows still decode and brings it back soon
    after. Every answer must still equal offline infer, and the loads show the evictions happened.
    """
    from adapter_set import chat_requests, mismatches, offline_answers, send_all
    from openai import OpenAI

    adapters = {"a1": sample.processed["a1"], "a2": sample.processed["a2"]}
    requests = chat_requests(list(adapters), 12, max_tokens=(30, 60), seed=3, tag="evict ")
    offline = offline_answers(sample, adapters, requests, tmp_path)
    with _one_replica(sample, "--threads", "1", "--api-key", "sesame", "--max-loras", "1",
                      "--max-lora-rank", "16", "--max-cpu-loras", "1") as (url, process):
        _answers(url, "sesame")
        client = OpenAI(base_url=f"{url}/v1", api_key="sesame", max_retries=0, timeout=120)
        results, errors = send_all(client, requests, "tiny", stagger_s=0.05)
        assert not errors, errors
        found = mismatches(requests, results, offline)
        assert not found, "\n".join(found)
        assert httpx.get(f"{url}/health", timeout=10).status_code == 200
        assert httpx.get(f"{url}/v1/models", timeout=10).status_code == 401
        assert httpx.get(f"{url}/metrics", timeout=10).status_code == 401
        time.sleep(1.5)  # the replica's next report
        metrics = httpx.get(f"{url}/metrics", headers={"Authorization": "Bearer sesame"}, timeout=10)
        assert metrics.status_code == 200
        loads = [sample.value for family in text_string_to_metric_families(metrics.text)
                 for sample in family.samples if sample.name == "edgelora_replica_adapter_loads_total"]
        print(f"adapter loads with room for one adapter, requests on two: {loads}")
        assert len(loads) == 1 and loads[0] >= 3, loads  # a1, a2, and at least one adapter again
        process.send_signal(signal.SIGTERM)
        try:
            assert process.wait(timeout=120) == 0
        except subprocess.TimeoutExpired:
            pytest.fail("edgelora serve --ray did not stop within 120 s of SIGTERM")


@pytest.mark.cuda
def test_serve_ray_on_a_gpu(sample):
    """--device cuda: the replica gets a GPU from Ray and answers from the CUDA graph."""
    with _one_replica(sample, "--device", "cuda") as (url, _):
        _answers(url)
