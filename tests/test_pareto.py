"""Pareto trade-off (thesis eq. 4.1, 4.2.5.1, 5.1.5), run-record reading, thesis tables and the sweep plan."""

from __future__ import annotations

import json

import pytest

from monai_peft.analysis import RunRecord, load_run_records, pareto_scores, plot_tradeoff, scores_table
from monai_peft.analysis.sweeps import collect_sweep, main as sweeps_main, plan_sweep, subsample
from monai_peft.analysis.tables import thesis_tables

# thesis Table 5.5: trainable parameters (M) and test Mean Dice
TABLE_5_5 = [
    ("unet", "full", 19.0, 0.90), ("unet", "lora", 12.8, 0.68), ("unet", "convadapter", 12.5, 0.83),
    ("segresnet", "full", 4.7, 0.89), ("segresnet", "lora", 1.1, 0.60), ("segresnet", "convadapter", 0.7, 0.84),
]


def table_5_5() -> list[RunRecord]:
    return [RunRecord(b, m, p * 1e6, d) for b, m, p, d in TABLE_5_5]


def by_key(points):
    return {(p.record.backbone, p.record.method): p for p in points}


def test_thesis_table_5_5_gives_the_reported_scores():
    pts = by_key(pareto_scores(table_5_5()))
    # thesis 5.1.5: ConvAdapter in SegResNet 0.91, in UNet 0.84; both on the frontier and best
    assert round(pts["segresnet", "convadapter"].score, 2) == 0.91
    assert round(pts["unet", "convadapter"].score, 2) == 0.84
    assert pts["segresnet", "convadapter"].score == pytest.approx(0.5 * 0.24 / 0.29 + 0.5)
    assert {k for k, p in pts.items() if p.on_frontier} == {("segresnet", "convadapter"), ("unet", "convadapter")}
    assert {k for k, p in pts.items() if p.best} == {("segresnet", "convadapter"), ("unet", "convadapter")}
    # Fig. 5.5 coordinates against each backbone's full fine-tuning
    p = pts["segresnet", "convadapter"]
    assert p.dice_diff == pytest.approx(-0.05) and p.param_reduction == pytest.approx(1 - 0.7 / 4.7)
    assert pts["unet", "full"].dice_diff == 0.0 and pts["unet", "full"].param_reduction == 0.0
    # normalising both backbones together would not reproduce the thesis (0.90, not 0.91)
    pooled = by_key(pareto_scores(table_5_5(), per_backbone=False))
    assert round(pooled["segresnet", "convadapter"].score, 2) == 0.90


def test_hand_checked_frontier_walk():
    runs = [RunRecord("net", "a", 1, 0.5), RunRecord("net", "b", 2, 0.8), RunRecord("net", "c", 3, 0.7),
            RunRecord("net", "full", 4, 0.9)]
    pts = pareto_scores(runs)
    # D = 0, .75, .5, 1; P = 0, 1/3, 2/3, 1
    assert [p.score for p in pts] == pytest.approx([0.5, 0.375 + 1 / 3, 0.25 + 1 / 6, 0.5])
    assert [p.on_frontier for p in pts] == [True, True, False, False]  # d ties a's 0.5, does not beat it
    assert [p.best for p in pts] == [False, True, False, False]
    assert [p.pareto_optimal for p in pts] == [True, True, False, True]
    dice_only = pareto_scores(runs, w_dice=1.0, w_params=0.0)
    assert [p.on_frontier for p in dice_only] == [True, True, False, True]
    assert "* best" in scores_table(pts)
    with pytest.raises(ValueError, match="no run records"):
        pareto_scores([])
    with pytest.raises(ValueError, match="w_dice"):
        pareto_scores(runs, w_dice=-1)


def test_reads_run_records_of_the_workflows_and_csv(tmp_path):
    run = tmp_path / "runs" / "a"
    run.mkdir(parents=True)
    (run / "results.json").write_text(json.dumps({
        "record_version": 1, "method": "convadapter", "preset": "segresnet-convadapter-resblock-parallel",
        "parameters": {"trainable": 700000, "total": 4700000, "trainable_percent": 14.9},
        "validation": {"mean_dice": 0.95}, "test": {"mean_dice": 0.84, "n_cases": 3},
        "costs": {"train_s_per_volume": 2.11}}))
    (tmp_path / "runs" / "b.json").write_text(json.dumps(
        [{"backbone": "segresnet", "method": "full", "trainable_params": 4.7e6, "dice": 0.89, "data_fraction": 50}]))
    csv = tmp_path / "more.csv"
    csv.write_text("backbone,method,params,dice,placement\nunet,lora,12800000,0.68,encoder\n")
    records = load_run_records([tmp_path / "runs", tmp_path / "runs" / "b.json", csv])
    a, b, c = records
    assert (a.backbone, a.method, a.params, a.dice, a.total_params) == ("segresnet", "convadapter", 700000, 0.84, 4.7e6)
    assert a.placement == "segresnet-convadapter-resblock-parallel" and a.costs == {"train_s_per_volume": 2.11}
    assert (b.backbone, b.dice, b.data_fraction) == ("segresnet", 0.89, 0.5)
    assert (c.label, c.params) == ("lora[encoder]", 12.8e6)
    bad = tmp_path / "bad.csv"
    bad.write_text("backbone,method,dice\nunet,lora,0.6\n")
    with pytest.raises(ValueError, match="bad.csv.*params"):
        load_run_records([bad])
    (tmp_path / "nodice.json").write_text(json.dumps({"method": "lora", "trainable_params": 5}))
    with pytest.raises(ValueError, match="nodice.json.*dice"):
        load_run_records([tmp_path / "nodice.json"])
    with pytest.raises(FileNotFoundError, match="missing"):
        load_run_records([tmp_path / "missing"])


def test_tradeoff_plot(tmp_path):
    path = plot_tradeoff(pareto_scores(table_5_5()), tmp_path / "fig_5_5.png")
    assert path.stat().st_size > 5000 and path.read_bytes()[:4] == b"\x89PNG"


def test_thesis_tables_from_sweep_records():
    recs = table_5_5()
    # thesis Table 5.6 (data sizes), 5.8 (vertebrae) and 5.9 (MR organs) for SegResNet FFT / ConvAdapter
    for frac, fft, ca in ((0.5, 0.87, 0.84), (0.1, 0.79, 0.73)):
        recs += [RunRecord("segresnet", "full", 4.7e6, fft, data_fraction=frac),
                 RunRecord("segresnet", "convadapter", 0.7e6, ca, data_fraction=frac)]
    recs += [RunRecord("segresnet", "full", 4.7e6, 0.79, task="vertebrae"),
             RunRecord("segresnet", "convadapter", 0.7e6, 0.73, task="vertebrae"),
             RunRecord("segresnet", "full", 4.7e6, 0.54, task="mr_organs"),
             RunRecord("segresnet", "convadapter", 0.7e6, 0.59, task="mr_organs")]
    tables = thesis_tables(recs)
    assert set(tables) == {"5.5", "5.6", "5.8", "5.9"}
    t55 = tables["5.5"]["json"]
    assert [c[1] for c in t55["columns"]] == ["FFT", "LoRA", "ConvAda"] * 2
    assert t55["rows"]["# Params (M)"] == pytest.approx([19, 12.8, 12.5, 4.7, 1.1, 0.7])
    t56 = tables["5.6"]["json"]
    assert [tuple(c) for c in t56["columns"]][:2] == [("100% data", "SegResNet-FFT"),
                                                      ("100% data", "SegResNet-ConvAda")]
    assert t56["rows"]["Mean Dice"] == [0.89, 0.84, 0.87, 0.84, 0.79, 0.73]  # only the swept SegResNet pairs
    assert tables["5.8"]["json"]["rows"]["Mean Dice"] == [0.79, 0.73]
    assert tables["5.9"]["json"]["rows"]["Mean Dice"] == [0.54, 0.59]
    assert "| Mean Dice | 0.54 | 0.59 |" in tables["5.9"]["markdown"]


def test_sweep_plan_and_collect(tmp_path, capsys):
    from monai_peft.data import write_phantom_dataset

    write_phantom_dataset(tmp_path / "ct", 3, (8, 8, 8), seed=0)
    write_phantom_dataset(tmp_path / "mr", 3, (8, 8, 8), seed=0, modality="mr")
    datasets = {"ct": tmp_path / "ct", "mr": tmp_path / "mr"}
    runs = plan_sweep("bundles/x", output_root=tmp_path / "sweep", datasets=datasets)
    assert len(runs) == 2 * (3 + 2)
    assert {(r.task, r.data_fraction) for r in runs} == {("organs", 1.0), ("organs", 0.5), ("organs", 0.1),
                                                          ("vertebrae", 1.0), ("mr_organs", 1.0)}
    full, half = runs[0], runs[2]
    assert half.command[:4] == ["python", "-m", "monai.bundle", "run"]
    assert half.overrides["peft#preset"] == "segresnet-full-finetune"
    assert half.overrides["output_dir"].endswith("organs/50pct/segresnet-full-finetune")
    assert "data_fraction" not in full.overrides and half.overrides["data_fraction"] == 0.5
    assert [r.overrides["classes"] for r in runs[-4:]] == ["vertebrae", "vertebrae", "mr_organs", "mr_organs"]
    # each task reads its own folder: CT for organs and vertebrae, MR for the MR organs
    assert {r.task: r.overrides["dataset_dir"] for r in runs} == {
        "organs": str(tmp_path / "ct"), "vertebrae": str(tmp_path / "ct"), "mr_organs": str(tmp_path / "mr")}
    with pytest.raises(ValueError, match="fractions"):
        plan_sweep("b", fractions=[1.5], datasets=datasets)
    # a task without a folder, or a folder of the other modality, fails before anything is written
    with pytest.raises(ValueError, match=r"sweep tasks \['mr_organs'\] have no dataset folder: give --dataset "
                                         r"mr_organs=FOLDER \(or mr=FOLDER\)"):
        plan_sweep("bundles/x", output_root=tmp_path / "nothing", datasets={"ct": tmp_path / "ct"})
    with pytest.raises(ValueError, match=r"--classes 'organs' is a CT class group but --dataset_dir .*mr holds MR"):
        plan_sweep("bundles/x", output_root=tmp_path / "nothing", datasets={"organs": tmp_path / "mr"}, ood_tasks=())
    assert not (tmp_path / "nothing").exists()
    # the datalist helper for lists of one's own keeps a seeded fraction of the cases, in order
    cases = [{"image": f"s{i:04d}"} for i in range(20)]
    half_list = subsample(cases, 0.5)
    assert len(half_list) == 10 and half_list == subsample(cases, 0.5) and half_list == sorted(half_list, key=str)
    assert len(subsample(cases, 0.01)) == 1 and subsample(cases, 1.0) == cases
    assert sweeps_main(["plan", "bundles/x", "--output-root", str(tmp_path / "sweep"), "--ood", "vertebrae",
                        "--dataset", f"ct={tmp_path / 'ct'}"]) == 0
    script = (tmp_path / "sweep" / "sweep.sh").read_text().splitlines()
    assert len(script) == 3 + 2 * 4 and all(f"--dataset_dir {tmp_path / 'ct'}" in line for line in script[3:])
    capsys.readouterr()
    # finished runs (records without task / fraction: taken from their folders)
    finished = (("organs", "100pct", "full", 0.89), ("organs", "10pct", "full", 0.79),
                ("organs", "100pct", "convadapter", 0.84), ("organs", "10pct", "convadapter", 0.73))
    for task, pct, method, dice in finished:
        d = tmp_path / "sweep" / task / pct / method
        d.mkdir(parents=True)
        params = 4.7e6 if method == "full" else 0.7e6
        (d / "results.json").write_text(json.dumps({"method": method, "parameters": {"trainable": params},
                                                     "test": {"mean_dice": dice}}))
    result = collect_sweep(tmp_path / "sweep", backbone="segresnet")
    assert result["tables"]["5.6"]["json"]["rows"]["Mean Dice"] == [0.89, 0.84, 0.79, 0.73]
    assert sweeps_main(["collect", str(tmp_path / "sweep"), "--backbone", "segresnet",
                        "--markdown", str(tmp_path / "t.md")]) == 0
    assert "Table 5.6" in (tmp_path / "t.md").read_text()
