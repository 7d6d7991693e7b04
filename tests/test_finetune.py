"""Fine-tuning methods on every architecture: trained a few steps, exported, reloaded, served.

Function level, one process: a plain torch loop over the loop's own loss, the export the loop
makes (LoRA merged), and the serve engine's greedy answers against `generate()`.
"""

import pytest
import torch
from architectures import ARCHITECTURES, build, save, tokenizer
from conftest import engine_answers

from llm_dist.base import UserError
from llm_dist.finetune.methods import FineTuning, apply_method, blocks, check_base, linear_names
from llm_dist.serve.engine import Engine, Job
from llm_dist.train.losses import loss_sum_of

PROMPTS = ["def wrap(text, width=70):", "class TextWrapper:\n    "]


@pytest.fixture(scope="module")
def tok():
    return tokenizer()


@pytest.mark.parametrize("method", ["lora", "freeze"])
@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_every_architecture_fine_tunes_exports_reloads_and_serves(arch, method, tok, tmp_path):
    from transformers import AutoModelForCausalLM

    model = apply_method(build(arch, tok), FineTuning(method=method, lora_r=4, freeze_layers=1))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    tokens = torch.tensor([tok.encode(p * 4)[:33] for p in PROMPTS])
    losses = []
    for _ in range(4):
        loss = loss_sum_of(model, tokens) / tokens[:, 1:].numel()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= trainable
    if method == "lora":  # adapters on every linear layer of every block, nothing else trains
        assert trainable and all("lora_" in n for n in trainable)
        adapted = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable}
        assert adapted == set(linear_names(build(arch, tok)))
    else:  # the embeddings and block 0 keep their weights, block 1 trains
        first, second = (set(n for n, _ in b.named_parameters()) for b in blocks(model))
        frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
        assert model.get_input_embeddings().weight.requires_grad is False
        assert len(frozen) > len(first) and any(
            p.requires_grad for p in blocks(model)[1].parameters()
        )
        assert not any(p.requires_grad for p in blocks(model)[0].parameters()) and second

    model.eval()
    merged = getattr(model, "merge_and_unload", lambda: model)()
    merged.save_pretrained(tmp_path, safe_serialization=True)
    tok.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True).eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(tokens).logits, merged(tokens).logits, atol=1e-5)

    jobs = [Job(tok.encode(p), max_tokens=12, temperature=0.0) for p in PROMPTS]
    engine = Engine(reloaded, tok, max_batch_size=8, max_batch_total_tokens=4096)
    served = [text for text, _, _ in engine_answers(engine, jobs)]
    for prompt, text in zip(PROMPTS, served, strict=True):
        ids = torch.tensor([tok.encode(prompt)])
        out = reloaded.generate(
            ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id
        )
        assert text == tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def test_the_base_is_checked_before_any_trial(tmp_path):
    from llm_dist.tune.config import TuneConfig

    folder = save("gpt2", tmp_path)
    check_base(folder, TuneConfig(method="lora"))  # all-linear: GPT-2's Conv1D layers
    check_base(folder, TuneConfig(method="lora", lora_target_modules=["c_attn", "mlp.c_proj"]))
    with pytest.raises(UserError) as e:
        check_base(folder, TuneConfig(method="lora", lora_target_modules=["q_proj", "v_proj"]))
    assert str(e.value) == (
        "tune.lora_target_modules: ['q_proj', 'v_proj'] are not linear layers of the base model "
        "(GPT2LMHeadModel); its blocks' linear layers are ['c_attn', 'c_fc', 'c_proj'] (or "
        "write all-linear)"
    )
    space = {"method": {"grid": ["lora", "freeze"]}, "freeze_layers": {"choice": [0, 1, 2]}}
    with pytest.raises(
        UserError, match=r"tune.freeze_layers: 2 freezes every block of the 2-layer"
    ):
        check_base(folder, TuneConfig(search_space=space))
    check_base(folder, TuneConfig(search_space={**space, "freeze_layers": {"randint": [0, 2]}}))


@pytest.mark.parametrize(
    ("space", "problem"),
    [
        ({"freeze_layers": {"uniform": [0, 2]}}, "tune.search_space.freeze_layers.uniform: "
         "freeze_layers takes whole numbers >= 0: use choice, grid or randint of such numbers, "
         "got [0, 2]"),
        ({"lora_r": {"choice": [0, 8]}}, "tune.search_space.lora_r.choice: lora_r takes whole "
         "numbers >= 1"),
        ({"method": {"choice": ["lora", "qlora"]}}, "tune.search_space.method.choice: method is "
         "one of freeze, full, lora by choice or grid, got ['lora', 'qlora']"),
    ],
)  # fmt: skip
def test_search_spaces_draw_only_what_trials_take(space, problem):
    from pydantic import ValidationError

    from llm_dist.tune.config import TuneConfig

    with pytest.raises(ValidationError, match=problem.replace("[", r"\[").replace("]", r"\]")):
        TuneConfig(search_space=space)


def test_a_searched_setting_replaces_its_default_in_the_checks(tmp_path):
    from llm_dist.tune.config import TuneConfig

    folder = save("gpt2", tmp_path)
    space = {"method": {"choice": ["freeze", "full"]}, "freeze_layers": {"grid": [0, 1]}}
    check_base(folder, TuneConfig(freeze_layers=5, lora_target_modules=["q_proj"],
                                  search_space=space))  # fmt: skip
