"""Multi-task predictor: the backbone is loaded once and every task adapter runs on an image in turn.

Outputs per frame: segmentation mask (CAMUS labels, in the original image grid), view (2CH / 4CH), LV volume
(ml) and age (years); per study (ED + ES of both views): EDV, ESV and EF from the volume adapter and from
Simpson's biplane method on the predicted LV masks.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .data import preprocess_image
from .multitask import MultiTaskEchoModel, load_backbone
from .simpson import ejection_fraction, simpson_biplane

__all__ = ["EchoPredictor"]


class EchoPredictor:
    """Run all task adapters of one backbone on echo frames.

    Args:
        backbone_dir: backbone folder (:func:`~monai_peft.echo.multitask.save_backbone`).
        task_dirs: task folders (:meth:`MultiTaskEchoModel.save_task`).
        image_size: network input side. Default: the backbone's ``image_size`` metadata, else 128.
        device: device. Default CPU.
    """

    def __init__(self, backbone_dir: str | os.PathLike, task_dirs: Sequence[str | os.PathLike],
                 image_size: int | None = None, device: str | torch.device = "cpu") -> None:
        if not task_dirs:
            raise ValueError("EchoPredictor: task_dirs is empty; give at least one task folder.")
        backbone, meta = load_backbone(backbone_dir)
        self.model = MultiTaskEchoModel(backbone)
        for d in task_dirs:
            self.model.load_task(d)
        self.model.to(device).eval()
        self.device = device
        self.image_size = int(image_size or meta.get("image_size", 128))

    @property
    def tasks(self) -> list[str]:
        return list(self.model.tasks)

    @torch.no_grad()
    def predict(self, image: np.ndarray, tasks: Sequence[str] | None = None) -> dict:
        """Predict every task (or ``tasks``) on one frame.

        Args:
            image: ``(H, W)`` grayscale frame (0-255 range).
            tasks: subset of :attr:`tasks`. Default all.

        Returns:
            ``{task: value}``: segmentation ``(H, W)`` uint8 mask; classification ``{"label", "probabilities"}``;
            regression a float (or list) in target units.
        """
        image = np.asarray(image)
        if image.ndim != 2:
            raise ValueError(f"image: expected a (H, W) frame, got shape {image.shape}.")
        x = preprocess_image(image, self.image_size)[None].to(self.device)
        out: dict = {}
        for name in tasks or self.tasks:
            self.model.set_task(name)
            out[name] = self.postprocess(name, self.model(x)[0], image.shape)
        return out

    def postprocess(self, task: str, output: torch.Tensor, shape: tuple[int, int]):
        """One frame's network output of ``task`` (no batch dimension) -> the value :meth:`predict` returns."""
        spec = self.model.tasks[task]
        y = output[None].float().cpu()
        if spec.kind == "segmentation":
            return self._mask_to_image(y, shape)
        if spec.kind == "classification":
            prob = torch.softmax(y, dim=1)[0]
            names = spec.class_names or tuple(str(i) for i in range(spec.num_outputs))
            return {"label": names[int(prob.argmax())], "probabilities": {n: float(p) for n, p in zip(names, prob)}}
        v = spec.decode(y)[0].tolist()
        return v[0] if len(v) == 1 else v

    @staticmethod
    def _mask_to_image(logits: torch.Tensor, shape: tuple[int, int]) -> np.ndarray:
        """Undo center crop + resize: ``(1, K, S, S)`` logits -> ``(H, W)`` label mask."""
        h, w = shape
        s = min(h, w)
        up = F.interpolate(logits.float().cpu(), size=(s, s), mode="bilinear", align_corners=False)
        mask = np.zeros((h, w), np.uint8)
        top, left = (h - s) // 2, (w - s) // 2
        mask[top:top + s, left:left + s] = up.argmax(dim=1)[0].numpy().astype(np.uint8)
        return mask

    def predict_study(self, frames: Mapping[tuple[str, str], tuple[np.ndarray, Sequence[float]]],
                      lv_label: int = 1) -> dict:
        """Predict a study: the ED and ES frames of the 2CH and 4CH views.

        Args:
            frames: ``{(view, phase): (image (H, W), spacing (row, col) mm)}`` for views ``2CH``/``4CH`` and
                phases ``ED``/``ES``.
            lv_label: LV cavity label of the segmentation task. Default 1.

        Returns:
            ``{"frames": {"2CH_ED": {...}, ...}, "volume_adapter": {"EDV", "ESV", "EF"},
            "simpson": {"EDV", "ESV", "EF"}}`` (each summary only when its task is loaded).
        """
        keys = [(v, p) for v in ("2CH", "4CH") for p in ("ED", "ES")]
        missing = [f"{v}_{p}" for v, p in keys if (v, p) not in frames]
        if missing:
            raise ValueError(f"frames: missing {missing}; expected keys ('2CH'|'4CH', 'ED'|'ES').")
        preds = {f"{v}_{p}": self.predict(frames[(v, p)][0]) for v, p in keys}
        return self.summarise_study(preds, {k: sp for k, (_, sp) in frames.items()}, lv_label)

    def summarise_study(self, preds: Mapping[str, dict], spacings: Mapping[tuple[str, str], Sequence[float]],
                        lv_label: int = 1) -> dict:
        """Study summary from per-frame predictions ``{"2CH_ED": {task: value}, ...}`` (see :meth:`predict_study`)."""
        result: dict = {"frames": dict(preds)}
        if "volume" in self.model.tasks:
            edv = float(np.mean([preds[f"{v}_ED"]["volume"] for v in ("2CH", "4CH")]))
            esv = float(np.mean([preds[f"{v}_ES"]["volume"] for v in ("2CH", "4CH")]))
            result["volume_adapter"] = {"EDV": edv, "ESV": esv, "EF": ejection_fraction(edv, esv) if edv > 0 else None}
        seg = next((n for n, s in self.model.tasks.items() if s.kind == "segmentation"), None)
        if seg is not None:
            vols = {}
            for phase in ("ED", "ES"):
                m2, m4 = (preds[f"{v}_{phase}"][seg] == lv_label for v in ("2CH", "4CH"))
                try:
                    vols[phase] = simpson_biplane(m2, m4, spacings[("2CH", phase)], spacings[("4CH", phase)])
                except ValueError:
                    vols[phase] = None  # no LV predicted in one view
            ok = vols["ED"] and vols["ES"] is not None
            result["simpson"] = {"EDV": vols["ED"], "ESV": vols["ES"],
                                 "EF": ejection_fraction(vols["ED"], vols["ES"]) if ok else None}
        return result
