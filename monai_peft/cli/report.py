"""Parameter report of a fine-tuning method on a network: trainable / total / percent per region and kind.

Examples::

    monai-peft report --network segresnet --method convadapter --adapter-conv dense
    monai-peft report --network segresnet --method lora --r dynamic --train-fully decoder --json
"""

from __future__ import annotations

import argparse
import json

from monai_peft.cli._arg_types import positive_int, rank

NETWORKS = ("segresnet", "basicunet")


def _network(name: str, out_channels: int):
    from monai.networks.nets import BasicUNet, SegResNet

    if name == "segresnet":  # SuPreM's SegResNet layout (thesis 4.2.1)
        return SegResNet(spatial_dims=3, init_filters=16, blocks_down=(1, 2, 2, 4), blocks_up=(1, 1, 1),
                         in_channels=1, out_channels=out_channels, dropout_prob=0.0)
    return BasicUNet(spatial_dims=3, in_channels=1, out_channels=out_channels)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--network", choices=NETWORKS, default="segresnet")
    parser.add_argument("--method", default="convadapter",
                        help="a method of monai_peft.adapt: convadapter (default), lora, ssf, bitfit, norm, full, "
                             "decoder, head")
    parser.add_argument("--out-channels", type=positive_int, default=18, help="classes incl. background (default 18)")
    parser.add_argument("--train-fully", default=None, help="region trained fully besides the adapters")
    parser.add_argument("--r", type=rank, default=None, help="LoRA rank (int or 'dynamic')")
    parser.add_argument("--gamma", type=positive_int, default=None, help="ConvAdapter compression factor")
    parser.add_argument("--adapter-conv", default=None,
                        help="ConvAdapter down-projection: depthwise (the paper's, default) or dense")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run(args: argparse.Namespace) -> int:
    import monai_peft

    kwargs: dict = {}
    if args.r is not None:
        kwargs["r"] = args.r
    if args.gamma is not None:
        kwargs["gamma"] = args.gamma
    if args.adapter_conv is not None:
        kwargs["adapter_conv"] = args.adapter_conv
    model = _network(args.network, args.out_channels)
    peft_model = monai_peft.adapt(model, args.method, train_fully=args.train_fully, **kwargs)
    report = monai_peft.parameter_report(peft_model)
    if args.json:
        print(json.dumps({"network": args.network, "method": args.method, **report.as_dict()}, indent=2))
    else:
        print(f"{args.network} + {args.method}")
        print(report.table())
    return 0
