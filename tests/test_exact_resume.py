"""Resume is exact: a run stopped after an epoch and resumed from ``adapter/last`` ends at the same weights, optimizer
state and learning rate as the same run never interrupted (optimizer, scheduler and random generators restored)."""

from __future__ import annotations

import torch
from ignite.engine import Events
from monai.networks.nets import SegResNet
from torch.utils.data import DataLoader

import monai_peft
from monai_peft.workflows.engines import build_trainer

EPOCHS = 3


def _network() -> torch.nn.Module:
    torch.manual_seed(0)
    net = SegResNet(spatial_dims=3, in_channels=1, out_channels=2, init_filters=8, blocks_down=(1, 1), blocks_up=(1,))
    return monai_peft.adapt(net, "convadapter")


def _loader() -> DataLoader:
    g = torch.Generator().manual_seed(1)
    items = [{"image": torch.rand(1, 8, 8, 8, generator=g), "label": (torch.rand(1, 8, 8, 8, generator=g) > 0.6).float()}
             for _ in range(4)]
    return DataLoader(items, batch_size=1, shuffle=True)  # the order of each epoch comes from torch's global RNG


def _train(out, resume: bool = False, stop_after: int | None = None) -> tuple[torch.nn.Module, object]:
    net = _network()
    if resume:
        torch.manual_seed(12345)  # a fresh process has other generator states; resume must bring back the saved ones
    trainer = build_trainer(net, _loader(), EPOCHS, out, lr=1e-2, resume=resume, progress=False, log_stats=False)
    if stop_after is not None:  # killed right after the epoch's checkpoint
        trainer.add_event_handler(Events.EPOCH_COMPLETED(once=stop_after), lambda e: e.terminate())
    trainer.run()
    return net, trainer


def test_resumed_run_ends_at_the_weights_of_an_uninterrupted_run(tmp_path):
    straight, straight_trainer = _train(tmp_path / "straight")
    _train(tmp_path / "resumed", stop_after=1)
    resumed, resumed_trainer = _train(tmp_path / "resumed", resume=True)

    trained = [k for k, p in straight.named_parameters() if p.requires_grad]
    assert trained and resumed_trainer.state.epoch == EPOCHS
    start = _network().state_dict()
    assert not all(torch.equal(straight.state_dict()[k], start[k]) for k in trained), "training changed nothing"
    for key in trained:
        assert torch.equal(resumed.state_dict()[key], straight.state_dict()[key]), key
    a, b = straight_trainer.optimizer.state_dict()["state"], resumed_trainer.optimizer.state_dict()["state"]
    assert a.keys() == b.keys() and all(torch.equal(a[i]["exp_avg_sq"], b[i]["exp_avg_sq"]) for i in a)
    assert resumed_trainer.lr_scheduler.get_last_lr() == straight_trainer.lr_scheduler.get_last_lr()


def test_without_the_saved_generators_the_resumed_run_differs(tmp_path, monkeypatch):
    """The check above can fail: dropping the generator state from the checkpoint changes the final weights."""
    from monai_peft.handlers import adapter_checkpoint

    straight, _ = _train(tmp_path / "straight")
    monkeypatch.setattr(adapter_checkpoint, "set_rng_state", lambda state: None)
    _train(tmp_path / "resumed", stop_after=1)
    resumed, _ = _train(tmp_path / "resumed", resume=True)
    trained = [k for k, p in straight.named_parameters() if p.requires_grad]
    assert not all(torch.equal(resumed.state_dict()[k], straight.state_dict()[k]) for k in trained)
