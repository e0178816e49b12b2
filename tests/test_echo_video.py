"""Video EF (EchoAI): VideoMAE model and checkpoints, tube masking, EchoNet video reading and clips, metrics,
and (slow) EF learning on phantom videos that beats predicting the training mean."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest
import torch
import transformers

from monai_peft.echo import find_echonet, regression_metrics, write_echonet_phantom
from monai_peft.echo.video import (ClipAverageInferer, SampleClipsd, VideoEFNet, VideoMAEPretrainNet, adapt_video_ef,
                                   echonet_video_datalist, load_videomae_weights, save_videomae_checkpoint, tube_mask,
                                   video_transforms, videomae_config)

TINY = {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32,
        "decoder_hidden_size": 16, "decoder_num_hidden_layers": 1, "decoder_num_attention_heads": 2,
        "decoder_intermediate_size": 32}
# (image_size, num_frames, patch_size, tubelet_size)
GEOMETRIES = [(32, 8, 8, 2), (48, 4, 16, 1), (16, 6, 4, 3)]
METHODS = [("lora", "attention", {"r": 4}), ("lora", "all", {"r": 2}), ("ssf", None, {}), ("bitfit", None, {}),
           ("norm", None, {}), ("full", None, {}), ("head", None, {}), ("bottleneck", None, {}),
           ("bottleneck", None, {"insertion": "parallel"})]


def _cfg(image=32, frames=8, patch=8, tubelet=2, **kw):
    return videomae_config("small", image, frames, patch, tubelet, **{**TINY, **kw})


def _clips(cfg, n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, cfg.num_frames, cfg.image_size, cfg.image_size, generator=g)


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_every_method_is_the_identity_at_init(geometry):
    cfg = _cfg(*geometry)
    x = _clips(cfg)
    for method, layers, kwargs in METHODS:
        torch.manual_seed(1)
        net = VideoEFNet(cfg).eval()
        with torch.no_grad():  # a non-trivial head, so "identity" is not "both predict the mean"
            net.head.linear.weight.normal_()
        ref = net(x)
        model = adapt_video_ef(net, method, layers or "attention", **kwargs).eval()
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        assert trainable, method
        if method not in ("full",):
            assert any(".head." in n for n in trainable), (method, trainable[:3])  # the new head always trains
        if method == "lora":
            assert all("lora_" in n or ".head." in n for n in trainable)
            assert any("attention.attention.query" in n for n in trainable)
            assert any("intermediate.dense" in n for n in trainable) == (layers == "all")
        torch.testing.assert_close(model(x), ref, rtol=0, atol=1e-5, msg=f"{method} changes the output at init")
    assert ref.shape == (2, 1)


def test_wrong_clip_shape_and_unknown_method_are_named():
    net = VideoEFNet(_cfg())
    with pytest.raises(ValueError, match=r"expected clips \(B, 1, 8, 32, 32\).*got \(2, 1, 4, 32, 32\)"):
        net(torch.rand(2, 1, 4, 32, 32))
    with pytest.raises(ValueError, match="unknown method 'prompt-tuning'"):
        adapt_video_ef(VideoEFNet(_cfg()), "prompt-tuning")
    with pytest.raises(ValueError, match="layers: expected one of"):
        adapt_video_ef(VideoEFNet(_cfg()), "lora", layers="mlp")


def test_tube_mask_hides_the_same_patches_in_every_tubelet():
    cfg = _cfg(32, 8, 8, 2)  # 16 patches per frame, 4 tubelets
    mask = tube_mask(3, cfg, 0.9, generator=torch.Generator().manual_seed(0))
    assert mask.shape == (3, 64) and mask.dtype == torch.bool
    per_tube = mask.view(3, 4, 16)
    assert (per_tube == per_tube[:, :1]).all()  # tube masking: the same spatial patches in every tubelet
    assert per_tube[:, 0].sum(1).tolist() == [14, 14, 14]  # round(0.9 * 16) hidden, 2 visible
    assert not torch.equal(per_tube[0, 0], per_tube[1, 0])  # a new mask per clip
    with pytest.raises(ValueError, match="mask_ratio"):
        tube_mask(1, cfg, 1.0)
    net = VideoMAEPretrainNet(cfg)
    loss = net(_clips(cfg))
    assert loss.shape == (1,) and math.isfinite(float(loss.detach()))
    loss.sum().backward()
    assert net.mae.videomae.encoder.layer[0].attention.attention.query.weight.grad.abs().sum() > 0


def test_checkpoints_load_locally_and_refuse_anything_else(tmp_path):
    cfg = _cfg()
    torch.manual_seed(0)
    pre = VideoMAEPretrainNet(cfg)
    save_videomae_checkpoint(pre, tmp_path / "ckpt")
    net = VideoEFNet.from_checkpoint(tmp_path / "ckpt")
    for (k, v), w in zip(pre.mae.videomae.state_dict().items(), net.videomae.state_dict().values()):
        assert torch.equal(v, w), k
    # the folder is a regular transformers checkpoint, and our reader reads transformers' own files
    hf = transformers.VideoMAEForPreTraining.from_pretrained(str(tmp_path / "ckpt"), local_files_only=True)
    assert torch.equal(hf.videomae.encoder.layer[0].attention.attention.value.bias,
                       net.videomae.encoder.layer[0].attention.attention.value.bias)
    rgb_cfg = videomae_config("small", 32, 8, 8, **TINY, num_channels=3)
    rgb = transformers.VideoMAEModel(rgb_cfg)
    rgb.config.num_channels = 3
    rgb.save_pretrained(str(tmp_path / "rgb"))  # a 3-channel encoder (e.g. a Kinetics checkpoint)
    gray = VideoEFNet.from_checkpoint(tmp_path / "rgb")
    w = rgb.embeddings.patch_embeddings.projection.weight
    torch.testing.assert_close(gray.videomae.embeddings.patch_embeddings.projection.weight, w.sum(1, keepdim=True))
    # a state-dict file (weights_only) of our own network
    torch.save(net.state_dict(), tmp_path / "ef.pt")
    other = load_videomae_weights(VideoEFNet(cfg), tmp_path / "ef.pt")
    assert torch.equal(other.videomae.encoder.layer[0].output.dense.weight, net.videomae.encoder.layer[0].output.dense.weight)
    with pytest.raises(FileNotFoundError, match="never downloads"):
        VideoEFNet.from_checkpoint("MCG-NJU/videomae-base")
    with pytest.raises(FileNotFoundError, match="config.json"):
        VideoEFNet.from_checkpoint(tmp_path / "ef.pt")
    with pytest.raises(ValueError, match="do not fit the network"):
        load_videomae_weights(VideoEFNet(_cfg(hidden_size=32)), tmp_path / "ckpt")


def test_clip_sampling_and_clip_averaging():
    video = torch.arange(10, dtype=torch.uint8)[:, None, None].expand(10, 2, 2)  # frame i holds value i
    one = SampleClipsd("image", num_frames=3, stride=2, clips=1, random_start=False)({"image": video})["image"]
    assert one.shape == (1, 3, 2, 2) and one[0, :, 0, 0].tolist() == [0, 2, 4]
    many = SampleClipsd("image", num_frames=3, stride=2, clips=3)({"image": video})["image"]
    assert many.shape == (3, 1, 3, 2, 2)
    assert [c[0, :, 0, 0].tolist() for c in many] == [[0, 2, 4], [2, 4, 6], [5, 7, 9]]  # starts 0, 2.5->2, 5
    short = SampleClipsd("image", num_frames=4, stride=4, random_start=False)({"image": video})["image"]
    assert short[0, :, 0, 0].tolist() == [0, 4, 8, 0]  # past the end: a black frame
    rnd = SampleClipsd("image", num_frames=2, stride=1)
    rnd.set_random_state(0)
    starts = {int(rnd({"image": video})["image"][0, 0, 0, 0]) for _ in range(100)}
    assert starts == set(range(9))  # every start of a full clip is drawn
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(1))
    x = torch.rand(2, 3, 1, 4, 2, 2)
    out = ClipAverageInferer(clip_batch_size=2)(x, net)
    torch.testing.assert_close(out, torch.stack([net(x[i]).mean(0) for i in range(2)]))


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    root = tmp_path_factory.mktemp("echonet_video")
    rows = write_echonet_phantom(root, num_videos=5, num_frames=12, size=40, seed=4)
    return root, rows


def test_video_datalist_and_transforms_read_real_avi_files(phantom):
    root, rows = phantom
    items = echonet_video_datalist(root, "TRAIN")
    assert [d["name"] for d in items] == [r["FileName"] for r in rows if r["Split"] == "TRAIN"]
    assert items[0]["label"] == [pytest.approx(rows[0]["EF"])] and "FileList.csv row 2" in items[0]["where"]
    train = video_transforms(num_frames=4, stride=2, size=32, train=True)(items[0])
    assert train["image"].shape == (1, 4, 32, 32) and train["image"].dtype == torch.float32
    assert train["label"].shape == (1,) and float(train["label"]) == pytest.approx(rows[0]["EF"], abs=1e-4)
    assert 0.0 <= float(train["image"].min()) and float(train["image"].max()) <= 1.0
    ev = video_transforms(num_frames=4, stride=2, size=32, train=False, clips=3)(items[0])
    assert ev["image"].shape == (3, 1, 4, 32, 32)
    # the decoded frames are the phantom's: dark LV cavity inside a bright sector, and the LV shrinks at ES
    ed, es = rows[0]["ED"], rows[0]["ES"]
    from monai_peft.echo import read_video
    v = read_video(root / "Videos" / f"{rows[0]['FileName']}.avi")
    assert v.shape == (12, 40, 40)
    centre = (slice(14, 26), slice(17, 23))
    assert v[es][centre].mean() > v[ed][centre].mean()  # less dark cavity at end-systole


def _rewrite(path, edit):
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    edit(rows)
    with open(path, "w", newline="") as fh:
        csv.writer(fh).writerows(rows)


def test_bad_echonet_input_names_file_and_row(tmp_path):
    write_echonet_phantom(tmp_path, num_videos=5, num_frames=6, size=32, seed=0)  # TRAIN x3, VAL, TEST
    _rewrite(tmp_path / "FileList.csv", lambda r: r[2].__setitem__(1, "130"))  # EF of the 2nd video
    with pytest.raises(ValueError, match=r"FileList\.csv row 3 \(0X00000000000\d\): EF 130 is outside 0-100"):
        find_echonet(tmp_path)
    _rewrite(tmp_path / "FileList.csv", lambda r: r[2].__setitem__(1, "55"))
    _rewrite(tmp_path / "VolumeTracings.csv", lambda r: r[5].__setitem__(5, "17"))  # a frame of a 6-frame video
    with pytest.raises(ValueError, match=r"VolumeTracings\.csv row 6 \(.*\): traced frame 17 is not in the video "
                                         r"\(6 frames per .*FileList\.csv row 2\)"):
        find_echonet(tmp_path)
    assert len(find_echonet(tmp_path, "VAL")) == 1  # rows of other splits are not checked
    _rewrite(tmp_path / "VolumeTracings.csv", lambda r: r[5].__setitem__(5, "0"))
    broken = tmp_path / "Videos" / "0X000000000001.avi"
    broken.write_bytes(b"RIFF not really a video")
    with pytest.raises(ValueError, match=r"FileList\.csv row 3 \(0X000000000001\): cannot decode video"):
        echonet_video_datalist(tmp_path, "TRAIN")  # checked before any training starts
    item = echonet_video_datalist(tmp_path, "TRAIN", check_videos=False)[1]
    with pytest.raises(RuntimeError) as info:  # at load time MONAI wraps it, the cause names file and row
        video_transforms(num_frames=2, stride=1, size=16)(item)
    assert "FileList.csv row 3 (0X000000000001): cannot decode video" in str(info.value.__cause__)
    _rewrite(tmp_path / "FileList.csv", lambda r: [row.pop() for row in r])  # no Split column
    with pytest.raises(ValueError, match=r"missing column\(s\) \['Split'\].*never drawn at random"):
        echonet_video_datalist(tmp_path)


def test_regression_metrics_match_their_definitions():
    pred, target = np.array([52.0, 60.0, 41.0, 70.0]), np.array([50.0, 65.0, 40.0, 62.0])
    m = regression_metrics(pred, target)
    err = pred - target
    assert m["mae"] == pytest.approx(np.abs(err).mean())
    assert m["rmse"] == pytest.approx(math.sqrt((err ** 2).mean()))  # not the mean of per-case RMSEs (= MAE)
    assert m["rmse"] > m["mae"]
    assert m["r2"] == pytest.approx(1 - (err ** 2).sum() / ((target - target.mean()) ** 2).sum())
    assert regression_metrics(np.full(4, target.mean()), target)["r2"] == pytest.approx(0.0)
    assert regression_metrics([1.0], [2.0])["r2"] is None and regression_metrics([], [])["n"] == 0


@pytest.mark.slow
def test_ef_fine_tuning_beats_the_training_mean(tmp_path):
    """A short CPU fine-tune on phantom videos (one beating LV, EF 30-70 %) learns the EF from the motion."""
    from monai_peft.echo.video import finetune_video_ef
    from monai_peft.echo.video.demo import TINY_VIDEOMAE

    root = tmp_path / "data"
    write_echonet_phantom(root, 200, 16, 32, seed=3, depth_mm=110.0, same_geometry=True)
    torch.manual_seed(0)
    save_videomae_checkpoint(VideoMAEPretrainNet(videomae_config("small", 32, 8, **TINY_VIDEOMAE)), tmp_path / "init")
    rec = finetune_video_ef(tmp_path / "init", root, tmp_path / "run", "full", epochs=28, batch_size=16, lr=2e-3,
                            stride=2, clips=2, val_interval=4, cache_rate=1.0, progress=False)
    train = np.array([r.ef for r in find_echonet(root, "TRAIN", require_tracings=False)])
    test = np.array([r.ef for r in find_echonet(root, "TEST", require_tracings=False)])
    mean_mae = np.abs(test - train.mean()).mean()
    got = rec["test"]["all"]
    assert got["n"] == len(test) == 40
    assert got["mae"] < 0.6 * mean_mae, (got, mean_mae)  # a model that ignores the video scores ~1.0 x
    assert got["r2"] > 0.5
    assert (tmp_path / "run" / "test_predictions.csv").is_file() and (tmp_path / "run" / "test_predictions.png").is_file()
    assert rec["frozen_backbone"] is None  # full fine-tuning freezes nothing: there is no frozen backbone to check
    assert rec["parameters"]["trainable"] == rec["parameters"]["total"]


@pytest.mark.slow
@pytest.mark.parametrize("method, options, trainable", [
    ("vpt", {"num_tokens": 3}, 1 * 3 * 16),  # 1 block x 3 prompts x width 16
    ("bottleneck", {"insertion": "parallel", "bottleneck_size": 4}, 1 * 2 * (2 * 16 * 4 + 4 + 16)),  # 2 sites/block
])
def test_video_train_with_prompts_or_bottleneck_adapters_reloads_to_identical_predictions(phantom, tmp_path, method,
                                                                                          options, trainable):
    import json

    from safetensors.torch import load_file

    from monai_peft.cli import main
    from monai_peft.echo.video import evaluate_video_ef, predict_video_ef

    root, rows = phantom
    torch.manual_seed(0)
    save_videomae_checkpoint(VideoMAEPretrainNet(_cfg()), tmp_path / "ckpt")
    run = tmp_path / method
    option_args = [a for k, v in options.items() for a in ("--option", f"{k}={v}")]
    assert main(["echo", "video-train", "--checkpoint", str(tmp_path / "ckpt"), "--echonet", str(root), "--method",
                 method, *option_args, "--frames", "8", "--stride", "1", "--image-size", "32", "--epochs", "2",
                 "--batch-size", "2", "--clips", "2", "--out", str(run)]) == 0
    spec = json.loads((run / "ef_model.json").read_text())
    assert spec["method"] == method and spec["method_kwargs"] == options  # "3" read as the number 3
    record = json.loads((run / "results.json").read_text())
    head = 2 * 16 + 16 + 1
    assert record["parameters"]["trainable"] == trainable + head and record["frozen_backbone"]["unchanged"] is True
    saved = load_file(run / "adapter" / "best" / "adapter_model.safetensors")
    prefix = "vpt_prompts" if method == "vpt" else "bottleneck_"
    assert {k for k in saved if prefix not in k and ".head." not in k} == set()
    assert sum(v.numel() for k, v in saved.items() if prefix in k) == trainable
    if method == "bottleneck":  # zero-initialised up-projections: trained ones are not zero any more
        assert all(v.abs().sum() > 0 for k, v in saved.items() if "bottleneck_up" in k and k.endswith("weight"))
    # a fresh network + the saved adapter gives the trained model's test predictions, to the float
    test = evaluate_video_ef(run, root, out_dir=tmp_path / "again", progress=False, log_stats=False)
    assert test["all"]["mae"] == record["test"]["all"]["mae"] and test["all"]["n"] == 1
    assert (tmp_path / "again" / "test_predictions.csv").read_text() == (run / "test_predictions.csv").read_text()
    videos = [root / "Videos" / f"{r['FileName']}.avi" for r in rows if r["Split"] == "TEST"]
    predicted = predict_video_ef(run, videos)["videos"]
    (name, ef), = predicted.items()
    assert abs(ef - [r for r in rows if r["FileName"] == name][0]["EF"]) == pytest.approx(record["test"]["all"]["mae"])
