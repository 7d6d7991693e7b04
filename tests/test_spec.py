"""Job specs: every shipped spec validates; bad specs name their field; overrides are typed."""

import re
from pathlib import Path

import pytest
import yaml

from llm_dist.base import UserError
from llm_dist.spec import JobSpec, load_spec

JOBS = sorted((Path(__file__).parent.parent / "jobs").glob("*.yaml"))
MINIMAL = {"name": "t", "stages": ["data", "pretrain"], "data": {"sources": ["c.jsonl"]}}


def write(tmp_path: Path, spec: dict) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def problems(tmp_path: Path, spec: dict, overrides=()) -> str:
    with pytest.raises(UserError) as err:
        load_spec(write(tmp_path, spec), list(overrides))
    return str(err.value)


@pytest.mark.parametrize("path", JOBS, ids=[p.name for p in JOBS])
def test_shipped_specs_validate(path):
    spec = load_spec(path)
    assert spec.name and spec.stages
    assert spec.pretrain.train_batch_size % spec.pretrain.num_workers == 0


def test_minimal_spec_gets_working_defaults(tmp_path):
    spec = load_spec(write(tmp_path, MINIMAL))
    assert spec.model.preset == "tiny"
    assert spec.pretrain.zero_stage == 2 and spec.pretrain.num_workers == 2
    assert spec.pretrain.train_batch_size == 2 * 8 * 1
    assert spec.serve.host == "127.0.0.1"


def merged(section: str, **fields) -> dict:
    spec = yaml.safe_load(yaml.safe_dump(MINIMAL))
    spec.setdefault(section, {}).update(fields)
    return spec


# (spec, a fragment the message must contain: the field path and what is wrong)
BAD = {
    "unknown top key": ({**MINIMAL, "nmae": "x"}, "nmae: unknown key 'nmae' in the spec; did you mean 'name'?"),
    "unknown section key": (merged("data", sourcez=["a"]), "data.sourcez: unknown key 'sourcez' in data; did you mean 'sources'?"),
    "bad name": ({**MINIMAL, "name": "a/b"}, "name: 'a/b' is not a folder name"),
    "bad storage scheme": ({**MINIMAL, "storage_path": "ftp://x"}, "storage_path: scheme ftp:// is not supported"),
    "unknown stage": ({**MINIMAL, "stages": ["data", "train"]}, "stages.1: got 'train'"),
    "stages out of order": ({**MINIMAL, "stages": ["pretrain", "data"]}, "stages: ['pretrain', 'data'] must list each stage once"),
    "no sources": ({**MINIMAL, "data": {}}, "data.sources: empty"),
    "bad fraction": (merged("data", max_bad_fraction=1.5), "data.max_bad_fraction: got 1.5"),
    "splits eat everything": (merged("data", val_fraction=0.5, test_fraction=0.5), "data.val_fraction + data.test_fraction"),
    "max below min chars": (merged("data", min_chars=100, max_chars=10), "data.max_chars: 10 is below data.min_chars"),
    "tiny vocab": (merged("data", tokenizer={"vocab_size": 10}), "data.tokenizer.vocab_size: got 10"),
    "seq_len past positions": (merged("data", seq_len=4096), "data.seq_len: 4096 exceeds the model's max_position_embeddings (512)"),
    "zero stage 5": (merged("pretrain", zero_stage=5), "pretrain.zero_stage: got 5"),
    "offload at zero 0": (merged("pretrain", zero_stage=0, offload_optimizer=True), "pretrain.offload_optimizer: needs ZeRO >= 1"),
    "param offload at zero 2": (merged("pretrain", offload_params=True), "pretrain.offload_params: needs ZeRO-3"),
    "indivisible global batch": (merged("pretrain", global_batch_size=20), "pretrain.global_batch_size: 20 is not divisible by num_workers x micro_batch_size = 16"),
    "global batch mismatch": (merged("pretrain", global_batch_size=32, grad_accum_steps=3), "pretrain.global_batch_size: 32 != num_workers x micro_batch_size x grad_accum_steps = 48"),
    "zero workers": (merged("pretrain", num_workers=0), "pretrain.num_workers: got 0"),
    "warmup past end": (merged("pretrain", max_steps=10, warmup_steps=10), "pretrain.warmup_steps: 10 is not below max_steps"),
    "min lr above lr": (merged("pretrain", lr=1e-4, min_lr=1e-3), "pretrain.min_lr: 0.001 is above lr"),
    "bad precision": (merged("pretrain", precision="fp8"), "pretrain.precision: got 'fp8'"),
    "deepspeed key owned by spec": (merged("pretrain", deepspeed={"train_batch_size": 64}), "pretrain.deepspeed.train_batch_size: generated from the spec; set pretrain.global_batch_size instead"),
    "deepspeed zero stage": (merged("pretrain", deepspeed={"zero_optimization": {"stage": 3}}), "pretrain.deepspeed.zero_optimization.stage"),
    "fp16 on cpu": ({**merged("pretrain", precision="fp16"), "cluster": {"use_gpu": False}}, "pretrain.precision: fp16 needs GPUs"),
    "two model sources": (merged("model", config="c.json"), "model: preset and config set; set exactly one"),
    "unknown preset": (merged("model", preset="70b"), "model.preset: got '70b'"),
    "vocab override": (merged("model", overrides={"vocab_size": 5}), "model.overrides.vocab_size: the vocabulary follows the tokenizer"),
    "heads do not divide": (merged("model", overrides={"num_attention_heads": 3}), "model.overrides: hidden_size 256 is not divisible by num_attention_heads 3"),
    "empty search space": ({**MINIMAL, "stages": ["tune"], "tune": {"task": {"sources": ["t.jsonl"]}}}, "tune.search_space: empty"),
    "untunable setting": (merged("tune", search_space={"colour": {"choice": [1]}}), "tune.search_space.colour: not a tunable setting"),
    "bad distribution": (merged("tune", search_space={"lr": [1, 2]}), "tune.search_space.lr: [1, 2] is not a distribution"),
    "reversed range": (merged("tune", search_space={"lr": {"loguniform": [1e-3, 1e-5]}}), "tune.search_space.lr.loguniform: needs [low, high] numbers with low < high"),
    "optuna grid": (merged("tune", search="optuna", search_space={"lr": {"grid": [1e-3]}}), "tune.search_space.lr.grid: optuna cannot search a grid"),
    "unreported metric": (merged("tune", metric="accuracy"), "tune.metric: accuracy is not reported; use one of val_loss, val_ppl, or see tune.task.metrics"),
    "metric not computed": (merged("tune", metric="val_rouge_l"), "tune.metric: val_rouge_l is not reported; use one of val_loss, val_ppl, or add rouge_l to tune.task.metrics"),
    "perplexity's old name": (merged("tune", metric="val_perplexity"), "tune.metric: val_perplexity is reported as val_ppl; use val_ppl"),
    "mode against the metric": (merged("tune", metric="val_loss", mode="max"), "tune.mode: max, but a lower val_loss is better; set tune.mode: min or leave it empty"),
    "metric of another format": (merged("tune", task={"sources": ["t.jsonl"], "format": "classify", "metrics": ["rouge_l"]}), "tune.task.metrics: rouge_l cannot be computed for format classify; use accuracy, f1_macro"),
    "empty stop string": (merged("tune", task={"sources": ["t.jsonl"], "stop": ["\n\n", ""]}), "tune.task.stop: an empty stop string would end every answer at once; remove it"),
    "one label": (merged("tune", task={"sources": ["t.jsonl"], "format": "classify", "labels": ["a", "a"]}), "tune.task.labels: ['a', 'a'] needs two or more distinct, non-blank labels"),
    "warmup past the budget": (merged("tune", max_steps=20, search_space={"warmup_steps": {"choice": [0, 30]}}), "tune.warmup_steps: 30 is not below tune.max_steps (20)"),
    "port out of range": (merged("serve", port=70000), "serve.port: got 70000"),
    "vllm on cpu": (merged("serve", engine="vllm", gpus_per_replica=0), "serve.engine: vllm needs a GPU per replica"),
    "batch above ongoing": (merged("serve", max_batch_size=64), "serve.max_ongoing_requests: 32 is below max_batch_size (64)"),
    "two key sources": (merged("serve", api_keys_env="K", api_keys_file="k.txt"), "serve.api_keys_env and serve.api_keys_file are both set"),
    "vllm past the positions": ({**merged("serve", engine="vllm", max_prompt_tokens=500, max_tokens=64), "stages": ["data", "pretrain", "serve"]}, "serve.max_prompt_tokens + serve.max_tokens: 500 + 64 = 564 exceeds the 512 positions of the model pretrained here (model:)"),
    "batch budget below a request": (merged("serve", max_batch_total_tokens=1000), "serve.max_batch_total_tokens: 1000 cannot hold one request of max_prompt_tokens + max_tokens (1024 + 256)"),
    "overload status": (merged("serve", overload_status=500), "serve.overload_status"),
    "autoscaling min above max": (merged("serve", autoscaling={"min_replicas": 3, "max_replicas": 2}), "serve.autoscaling.min_replicas: 3 is above max_replicas"),
    "bad placement": (merged("cluster", placement_strategy="RANDOM"), "cluster.placement_strategy: got 'RANDOM'"),
}  # fmt: skip


@pytest.mark.parametrize("spec,expected", BAD.values(), ids=BAD.keys())
def test_bad_spec_names_field(tmp_path, spec, expected):
    assert expected in problems(tmp_path, spec)


def test_every_problem_reported_together(tmp_path):
    spec = merged("pretrain", zero_stage=7)
    spec["serve"] = {"port": 0}
    spec["data"]["nope"] = 1
    message = problems(tmp_path, spec)
    assert "3 problem(s)" in message
    for field in ("pretrain.zero_stage", "serve.port", "data.nope"):
        assert field in message


def test_vllm_takes_api_keys(tmp_path):
    """Ray Serve LLM's ingress checks them (`llm_dist.serve.vllm`): no longer refused."""
    spec = {**merged("serve", engine="vllm", api_keys_env="K", max_prompt_tokens=256),
            "stages": ["data", "pretrain", "serve"]}  # fmt: skip
    assert load_spec(write(tmp_path, spec)).serve.api_keys_env == "K"


def test_overrides_are_typed_by_the_model(tmp_path):
    path = write(tmp_path, MINIMAL)
    spec = load_spec(
        path,
        [
            "name=007",  # text field: stays text, not the number 7
            "pretrain.zero_stage=3",
            "pretrain.lr=1e-4",
            "pretrain.min_lr=0",
            "data.sources=[a.jsonl, 's3://b/c.parquet']",
            "model.overrides={num_hidden_layers: 2}",
            "pretrain.deepspeed={wall_clock_breakdown: true}",
            "data.max_chars=null",
            "cluster.env.HF_HOME=/tmp/hf",
        ],
    )
    assert spec.name == "007"
    assert spec.pretrain.zero_stage == 3 and spec.pretrain.lr == 1e-4
    assert spec.data.sources == ["a.jsonl", "s3://b/c.parquet"]
    assert spec.model.overrides == {"num_hidden_layers": 2}
    assert spec.pretrain.deepspeed == {"wall_clock_breakdown": True}
    assert spec.data.max_chars is None
    assert spec.cluster.env == {"HF_HOME": "/tmp/hf"}


@pytest.mark.parametrize(
    "override,expected",
    [
        ("pretrain.zero_stage", "--set 'pretrain.zero_stage': expected dotted.key=value"),
        ("pretrain.zero=3", "--set pretrain.zero: unknown key 'zero' in pretrain; did you mean"),
        ("pretrain=3", "--set pretrain: is a section; set one of its keys"),
        ("pretrain.zero_stage=[1", "--set pretrain.zero_stage: value '[1' is not valid YAML"),
        ("pretrain.zero_stage=three", "pretrain.zero_stage: got 'three'"),
    ],
)
def test_bad_override_names_field(tmp_path, override, expected):
    assert expected in problems(tmp_path, MINIMAL, [override])


def test_override_does_not_touch_the_file(tmp_path):
    path = write(tmp_path, MINIMAL)
    before = path.read_text()
    load_spec(path, ["pretrain.zero_stage=3"])
    assert path.read_text() == before


def test_every_field_is_documented():
    def walk(model, prefix=""):
        for name, field in model.model_fields.items():
            assert field.description, f"{prefix}{name} has no docstring"
            sub = field.annotation
            if isinstance(sub, type) and hasattr(sub, "model_fields"):
                walk(sub, f"{prefix}{name}.")

    walk(JobSpec)


def test_the_gpu_check_validates_every_spec_it_would_run(tmp_path):
    """benchmarks/gpu_check.py --dry-run: what CI can check of it on CPU."""
    import subprocess
    import sys

    script = Path(__file__).parent.parent / "benchmarks" / "gpu_check.py"
    done = subprocess.run([sys.executable, str(script), "--dry-run", str(tmp_path)],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[:3] == [
        f"llm-dist data stdlib {tmp_path}/data",
        f"llm-dist run {tmp_path}/pretrain-1gpu.yaml",
        f"llm-dist run {tmp_path}/pretrain-2gpu.yaml",
    ]
    for name in ("pretrain-1gpu", "pretrain-2gpu", "serve-transformers", "serve-vllm"):
        spec = load_spec(tmp_path / f"{name}.yaml")
        assert spec.cluster.use_gpu is True
    assert load_spec(tmp_path / "pretrain-2gpu.yaml").pretrain.num_workers == 2
    assert load_spec(tmp_path / "serve-vllm.yaml").serve.api_keys_env  # keys on vLLM


@pytest.mark.parametrize("field,value", [
    ("storage_path", "s3://AKIA:s3cr3t@bucket/runs"),
    ("data.sources", ["s3://bucket/ok.jsonl", "s3://AKIA:s3cr3t@bucket/corpus/"]),
    ("tracking.tracking_uri", "https://bob:s3cr3t@mlflow.internal"),
    ("tracking.tracking_uri", "https://mlflow.internal/api?access_token=s3cr3t"),
    ("tune.base_model", "gs://bucket/model?X-Goog-Signature=s3cr3t"),
    ("serve.model", "s3://AKIA:s3cr3t@bucket/winner"),
])  # fmt: skip
def test_a_credential_in_a_uri_is_refused_naming_the_field_not_the_secret(tmp_path, field, value):
    """pyarrow takes `s3://KEY:SECRET@bucket`, some tracking servers `?access_token=`: either
    was copied into the manifest, MLflow and the dashboard. Refused when the spec is read."""
    raw = {"name": "r", "stages": ["data", "tune"], "data": {"sources": ["a.jsonl"]},
           "tune": {"base_model": "/m", "task": {"sources": ["t.jsonl"]},
                    "search_space": {"lr": {"choice": [1e-3]}}}}  # fmt: skip
    section, _, key = field.rpartition(".")
    (raw.setdefault(section, {}) if section else raw)[key] = value
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(UserError) as e:
        load_spec(path)
    where = f"{field}.1" if isinstance(value, list) else field
    assert f"  - {where}: holds a credential (" in str(e.value)
    assert "s3cr3t" not in str(e.value)


def test_cluster_env_values_are_redacted_in_every_record_of_the_spec(tmp_path, capsys):
    """`public` is what the manifest, MLflow, the report, `validate --print` and a submitted
    job hold; the values reach Ray only through its runtime_env (`real_env`)."""
    from llm_dist import cli
    from llm_dist.redact import REDACTED, public, real_env

    spec = JobSpec(name="r", stages=["data"], data={"sources": ["a.jsonl"]},
                   cluster={"env": {"HF_HOME": "/h", "DB_URL": "postgres://u:s3cr3t@db"}})  # fmt: skip
    assert public(spec)["cluster"]["env"] == {"HF_HOME": REDACTED, "DB_URL": REDACTED}
    assert spec.cluster.env["DB_URL"] == "postgres://u:s3cr3t@db"  # the spec itself keeps it
    assert real_env(public(spec)["cluster"]["env"]) == {}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec.model_dump(mode="json")))
    assert cli.main(["validate", str(path), "--print"]) == 0
    out = capsys.readouterr().out
    assert "s3cr3t" not in out
    # the suite's Ray may forward a worker's line, "(RayTrainWorker pid=N) ...", at any moment
    out = "".join(x for x in out.splitlines(True) if not re.match(r"(\x1b\[\d+m)?\(\w+ pid=", x))
    assert yaml.safe_load(out)["cluster"]["env"] == {"HF_HOME": REDACTED, "DB_URL": REDACTED}


def test_a_cluster_env_value_set_on_the_command_line_is_redacted_where_the_line_is_written():
    """The log's header and a run folder's lock name the command: `--set cluster.env.X=...`
    values, a place a user may put a key for one run, are REDACTED there."""
    from llm_dist.redact import REDACTED, command

    argv = ["/x/llm-dist", "run", "job.yaml", "--set", "cluster.env.HF_TOKEN=hf_s3cr3t",
            "--set=cluster.env.API_KEY=sk-s3cr3t", "--set", "name=team", "--verbose"]  # fmt: skip
    assert command(argv) == (
        f"llm-dist run job.yaml --set cluster.env.HF_TOKEN={REDACTED} "
        f"--set=cluster.env.API_KEY={REDACTED} --set name=team --verbose"
    )


def test_a_secret_named_in_cluster_env_is_refused_where_a_shared_cluster_would_show_it():
    """A submitted job's runtime_env and a driver's that joins `cluster.address` are both
    shown by the dashboard: a name that says secret is refused; REDACTED values (a
    submitted job's own spec, set by Ray already) and plain names pass."""
    from llm_dist.redact import REDACTED, check_shared_env

    check_shared_env({"HF_HOME": "/h", "NCCL_DEBUG": "INFO", "HF_TOKEN": REDACTED})
    with pytest.raises(UserError, match=r"^cluster.env.HF_TOKEN: on a shared cluster Ray shows"):
        check_shared_env({"HF_HOME": "/h", "HF_TOKEN": "hf_s3cr3t"})
