"""Building the causal LM from a preset, a HF config file or a local folder, and its FLOPs."""

import json

import pytest
import torch

from llm_dist.base import UserError
from llm_dist.data.tokenizer import train_bpe
from llm_dist.model import PRESETS, ModelConfig, build, flops_per_token


@pytest.fixture(scope="module")
def tokenizer():
    texts = [f"def f{i}(x):\n    return x * {i}\n" for i in range(200)]
    return train_bpe(texts, vocab_size=300, seq_len=64)


def test_tiny_preset_follows_the_tokenizer(tokenizer):
    model = build(ModelConfig(preset="tiny"), tokenizer)
    assert model.config.model_type == "llama"
    assert model.config.vocab_size == len(tokenizer) == 300
    assert model.config.eos_token_id == tokenizer.eos_token_id
    assert model.config.hidden_size == PRESETS["tiny"]["hidden_size"]
    ids = torch.randint(0, 300, (2, 16))
    out = model(input_ids=ids, labels=ids)
    assert out.logits.shape == (2, 16, 300)  # (B, T, vocab)
    assert abs(out.loss.item() - torch.log(torch.tensor(300.0)).item()) < 1.0  # near uniform


def test_overrides_and_config_file(tokenizer, tmp_path):
    small = build(ModelConfig(preset="tiny", overrides={"num_hidden_layers": 2}), tokenizer)
    assert small.config.num_hidden_layers == 2
    path = tmp_path / "config.json"
    small.config.to_json_file(path)
    again = build(ModelConfig(preset=None, config=str(path), dropout=0.1), tokenizer)
    assert again.config.num_hidden_layers == 2 and again.config.attention_dropout == 0.1


def test_local_folder_and_vocabulary_mismatch(tokenizer, tmp_path):
    model = build(ModelConfig(preset="tiny"), tokenizer)
    model.save_pretrained(tmp_path / "m")
    loaded = build(ModelConfig(preset=None, path=str(tmp_path / "m")), tokenizer)
    for a, b in zip(model.state_dict().values(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b)  # the folder's weights, not fresh ones
    bigger = train_bpe([f"token{i} " * 3 for i in range(2000)], vocab_size=600, seq_len=64)
    with pytest.raises(
        UserError, match=r"model.path: .* has 300 token embeddings but the tokenizer has \d+ tokens"
    ):
        build(ModelConfig(preset=None, path=str(tmp_path / "m")), bigger)
    with pytest.raises(UserError, match=r"model.path: cannot load a model from"):
        build(ModelConfig(preset=None, path=str(tmp_path / "none")), tokenizer)
    (tmp_path / "bad.json").write_text(json.dumps({"model_type": "no-such-arch"}))
    with pytest.raises(UserError, match=r"model.config: cannot read"):
        build(ModelConfig(preset=None, config=str(tmp_path / "bad.json")), tokenizer)


def test_flops_per_token(tokenizer):
    model = build(ModelConfig(preset="tiny"), tokenizer)
    d, layers, ff, v = 256, 4, 704, 300
    per_layer = 4 * d * d + 3 * d * ff + 2 * d  # attention, MLP, two norms
    n = layers * per_layer + d + v * d  # + final norm + the (tied) output projection
    assert flops_per_token(model, 128) == 6 * n + 12 * layers * d * 128
