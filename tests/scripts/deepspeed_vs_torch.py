"""One process, tiny Llama, same seed: a DeepSpeed engine (config from the spec) vs plain torch.

Prints one JSON line: the two loss curves. Run as its own process: DeepSpeed's distributed
state is process-global.
"""

import json
import os
import sys

import torch

from llm_dist.data.tokenizer import train_bpe
from llm_dist.model import ModelConfig, build
from llm_dist.train.config import PretrainConfig
from llm_dist.train.deepspeed_config import deepspeed_config, lr_lambda, param_groups

zero_stage = int(sys.argv[1])
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2], RANK="0", WORLD_SIZE="1",
                  LOCAL_RANK="0")  # fmt: skip
p = PretrainConfig(num_workers=1, zero_stage=zero_stage, precision="fp32", micro_batch_size=4,
                   max_steps=8, warmup_steps=2, lr=3e-3, min_lr=3e-4, grad_clip=1.0)  # fmt: skip
tok = train_bpe([f"def f{i}(x): return x + {i}" for i in range(300)], 300, 32)
gen = torch.Generator().manual_seed(0)
fixed = [torch.randint(0, 300, (4, 33), generator=gen) for _ in range(2)]  # (B, T+1)
batches = [fixed[i % 2] for i in range(p.max_steps)]  # two batches, over and over: learnable


def model():
    torch.manual_seed(0)
    return build(ModelConfig(preset="tiny", overrides={"num_hidden_layers": 2}), tok)


def loss_of(m, batch):  # batch (B, T+1): inputs [:, :-1], next-token targets [:, 1:]
    logits = m(input_ids=batch[:, :-1]).logits
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())


# plain torch
m = model()
opt = torch.optim.AdamW(param_groups(m, p.weight_decay), lr=p.lr, betas=p.betas, eps=1e-8)
sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(p))
plain = []
for batch in batches:
    loss = loss_of(m, batch)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(m.parameters(), p.grad_clip)
    opt.step(), sched.step(), opt.zero_grad()
    plain.append(loss.item())

# DeepSpeed
import deepspeed  # noqa: E402

deepspeed.init_distributed(dist_backend="gloo")
m = model()
engine, _, _, _ = deepspeed.initialize(
    model=m, model_parameters=param_groups(m, p.weight_decay),
    config=deepspeed_config(p, use_gpu=False),
    lr_scheduler=lambda o: torch.optim.lr_scheduler.LambdaLR(o, lr_lambda(p)),
)  # fmt: skip
ds = []
for batch in batches:
    loss = loss_of(engine, batch)
    engine.backward(loss)
    engine.step()
    ds.append(loss.item())
print(json.dumps({"plain": plain, "deepspeed": ds}))
