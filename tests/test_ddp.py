"""Issue 12.4: DDP with adapters, two CPU processes (gloo) under ``torchrun``.

- the core: adapted SegResNets in ``DistributedDataParallel`` (as the bundles' ``multi_gpu_train.json`` wraps them)
  all-reduce exactly the trainable tensors, never fail on unused parameters, and stay identical on both ranks;
- nnU-Net: a PEFT trainer run per process as nnU-Net's ``run_ddp`` runs it, on a gloo process group and the CPU
  (``nnunet_plugin.distributed``).
The bundles' own ``multi_gpu_train.json`` runs in ``tests/test_bundles.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO

pytestmark = pytest.mark.slow

CORE_WORKER = r'''
import json, os, sys
import torch, torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from monai.networks.nets import SegResNet
import monai_peft

dist.init_process_group("gloo")
rank = dist.get_rank()
torch.set_num_threads(1)
CONFIGS = {
    "convadapter": dict(method="convadapter", train_fully="head"),
    "lora-fused": dict(method="lora", r=2, fused=True, train_fully="head"),
    "lora-peft": dict(method="lora", r=2, fused=False),
    "ssf": dict(method="ssf"),
    "decoder": dict(method="decoder"),
    "convadapter-checkpointed": dict(method="convadapter", activation_checkpointing="all"),
}
results = {}
for name, kwargs in CONFIGS.items():
    torch.manual_seed(0)  # the same network and adapters on both ranks
    net = SegResNet(spatial_dims=3, init_filters=8, blocks_down=(1, 2), blocks_up=(1,), in_channels=1,
                    out_channels=2)
    kwargs = dict(kwargs)
    model = monai_peft.adapt(net, kwargs.pop("method"), **kwargs).train()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    ddp = DDP(model)
    reduced = []

    def hook(state, bucket):
        reduced.append(bucket.buffer().numel())
        fut = dist.all_reduce(bucket.buffer(), async_op=True).get_future()
        return fut.then(lambda f: f.value()[0] / dist.get_world_size())

    ddp.register_comm_hook(None, hook)
    opt = torch.optim.SGD([p for p in ddp.parameters() if p.requires_grad], lr=0.1)
    per_step = []
    for step in range(2):
        g = torch.Generator().manual_seed(100 * rank + step)  # different data on each rank
        x = torch.randn(2, 1, 16, 16, 16, generator=g)
        reduced.clear()
        opt.zero_grad()
        ddp(x).square().mean().backward()
        opt.step()
        per_step.append(sum(reduced))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    checksum = float(sum(p.detach().double().sum() * (i + 1) for i, p in
                         enumerate(p for p in model.parameters() if p.requires_grad)))
    unchanged = all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    results[name] = {"reduced_per_step": per_step, "trainable": trainable, "checksum": checksum,
                     "frozen_unchanged": unchanged}
Path = __import__("pathlib").Path
Path(sys.argv[1], f"rank{rank}.json").write_text(json.dumps(results))
dist.barrier()  # both ranks done before the group goes (gloo threads otherwise may abort at exit)
dist.destroy_process_group()
'''

NNUNET_WORKER = r'''
import json, os, sys
import torch, torch.distributed as dist

dist.init_process_group("gloo")
rank = dist.get_rank()
from nnunetv2.run.run_training import get_trainer_from_args, maybe_load_checkpoint

trainer = get_trainer_from_args("903", "3d_fullres", 0, sys.argv[2], "nnUNetPlans", device=torch.device("cpu"))
maybe_load_checkpoint(trainer, False, False, sys.argv[3])
reduced = []

def hook(state, bucket):
    reduced.append(bucket.buffer().numel())
    fut = dist.all_reduce(bucket.buffer(), async_op=True).get_future()
    return fut.then(lambda f: f.value()[0] / dist.get_world_size())

trainer.network.register_comm_hook(None, hook)
trainer.run_training()
module = trainer.network.module
trainable = [p for p in module.parameters() if p.requires_grad]
result = {
    "ddp": type(trainer.network).__name__, "device": str(trainer.device), "batch_size": trainer.batch_size,
    "reduced_total": sum(reduced), "trainable": sum(p.numel() for p in trainable),
    "iterations": trainer.num_iterations_per_epoch * trainer.num_epochs,
    "checksum": float(sum(p.detach().double().sum() * (i + 1) for i, p in enumerate(trainable))),
}
__import__("pathlib").Path(sys.argv[1], f"rank{rank}.json").write_text(json.dumps(result))
dist.barrier()  # both ranks done before the group goes (gloo threads otherwise may abort at exit)
dist.destroy_process_group()
'''


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(extra or {})}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("PYTEST_XDIST_WORKER", None)
    return env


def _torchrun(script: Path, *args: str, env: dict[str, str], timeout: int = 400) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2",
           str(script), *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


def _ranks(folder: Path) -> list[dict]:
    return [json.loads((folder / f"rank{r}.json").read_text()) for r in (0, 1)]


def test_ddp_all_reduces_only_trainable_tensors_of_adapted_networks(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(CORE_WORKER)
    _torchrun(script, str(tmp_path), env=_env())
    rank0, rank1 = _ranks(tmp_path)
    for name, result in rank0.items():
        assert result["reduced_per_step"] == [result["trainable"]] * 2, name  # no frozen tensor, nothing skipped
        assert result["frozen_unchanged"], name
        assert result["checksum"] == pytest.approx(rank1[name]["checksum"], rel=1e-12), name  # ranks in sync
    assert rank0["decoder"]["trainable"] > rank0["convadapter"]["trainable"] > rank0["ssf"]["trainable"] > 0


def test_nnunet_peft_trainer_under_ddp_on_cpu(tmp_path):
    from nnunet_plugin.phantoms import make_phantom_dataset

    env = _env({
        "nnUNet_raw": str(tmp_path / "raw"), "nnUNet_preprocessed": str(tmp_path / "pre"),
        "nnUNet_results": str(tmp_path / "results"), "nnUNet_def_n_proc": "1", "nnUNet_compile": "0",
        "nnUNet_peft_epochs": "1", "nnUNet_peft_iterations": "2", "nnUNet_peft_val_iterations": "1",
        "nnUNet_peft_final_validation": "0", "nnUNet_peft_activation_checkpointing": "1",
    })
    make_phantom_dataset(tmp_path / "raw", 903, "PhantomDDP", num_cases=6, shape=(16, 16, 16), num_labels=1)
    plan = subprocess.run([sys.executable, "-c", "from nnunetv2.experiment_planning.plan_and_preprocess_entrypoints "
                           "import plan_and_preprocess_entry as f; import sys; sys.argv[0] = 'x'; f()",
                           "-d", "903", "-c", "3d_fullres", "-np", "1", "-npfp", "1"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert plan.returncode == 0, plan.stderr[-3000:]
    # pretrained weights: a stock network of the same plans in nnU-Net's checkpoint layout
    pretrained = tmp_path / "pretrained.pth"
    subprocess.run([sys.executable, "-c", (
        "import sys, torch; from nnunetv2.run.run_training import get_trainer_from_args; "
        "t = get_trainer_from_args('903', '3d_fullres', 0, 'nnUNetTrainer', 'nnUNetPlans', device=torch.device('cpu'));"
        " t.initialize(); torch.save({'network_weights': t.network.state_dict()}, sys.argv[1])"), str(pretrained)],
        env=env, check=True, capture_output=True, timeout=300)
    out = tmp_path / "ddp"
    out.mkdir()
    script = tmp_path / "worker.py"
    script.write_text(NNUNET_WORKER)
    _torchrun(script, str(out), "nnUNetTrainerConvAdapter", str(pretrained), env={**env, "nnUNet_n_proc_DA": "0"})
    rank0, rank1 = _ranks(out)
    assert rank0["ddp"] == "DistributedDataParallel" and rank0["device"] == "cpu"
    assert rank0["batch_size"] == 1  # nnU-Net's global batch of 2 split over the two processes
    assert rank0["reduced_total"] == rank0["trainable"] * rank0["iterations"]
    assert rank0["checksum"] == pytest.approx(rank1["checksum"], rel=1e-12)
