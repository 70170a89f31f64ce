"""Test metrics of a trained model over a whole prepared test split, as one JSON line.

    python -m ae.evaluate --model OUT/model.safetensors --data DIR [--noise SIGMA] [--device cpu|cuda]
                          [--no-verify-data]

The numbers come from the same code the trainer logs `test/*` with (`ae.metrics.eval_sums` over
`ae.data.eval_batches`, then `summarize` with the manifest's BCE floor), so for the same weights and data
they equal the last `test/...` record of OUT/metrics.jsonl. The JSON object is the last line of stdout:

    {"test_bce": ..., "test_bce_floor": ..., "test_bce_excess": ..., "test_mse": ..., "test_psnr_db": ...,
     "noisy_psnr_db": ..., "denoise_gain_db": ...,        # with --noise only
     "test_images": 10000, "noise": "gaussian:0.2" | null}

--noise SIGMA is Gaussian noise of that sigma (`gaussian:S` and `saltpepper:P` as in train.py work too),
drawn with the fixed evaluation seed the trainer uses; on the same kind of device it is the same noise.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

from ae.errors import OneLineParser, UserError, friendly_errors
from ae.weights import load_model, noise_arg, resolve_device, resolve_model_path


def build_parser() -> OneLineParser:
    p = OneLineParser(
        prog="python -m ae.evaluate", description="Test-split metrics of a trained model, as one JSON line."
    )
    p.add_argument("--model", required=True, help="OUT/model.safetensors written by train.py")
    p.add_argument(
        "--data", required=True, type=Path, metavar="DIR", help="folder made by `python -m data_prep`"
    )
    p.add_argument("--noise", help="evaluate denoising: Gaussian sigma (or gaussian:S / saltpepper:P)")
    p.add_argument("--device", help="cpu or cuda (default: cuda if available)")
    p.add_argument(
        "--no-verify-data",
        dest="verify_data",
        action="store_false",
        help="skip the SHA-256 check of test.beton (its size is still checked)",
    )
    return p


def evaluate(
    model_path: str | Path,
    data_dir: Path,
    noise: str | None = None,
    device: str | None = None,
    verify_data: bool = True,
) -> dict[str, Any]:
    """The test metrics of the weights in `model_path` on `data_dir`'s test split, keyed as printed."""
    from ae.beton import load_manifest, verify_beton

    manifest = load_manifest(data_dir)  # the cheap checks first: no torch or FFCV needed for them
    verify_beton(data_dir, "test", manifest, check_hash=verify_data)
    resolve_model_path(model_path)
    corruption = noise_arg(noise)
    torch_device = resolve_device(device)
    model = load_model(model_path, torch_device)

    from ae.data import eval_batches  # FFCV: imported only once the inputs are known to be good
    from ae.metrics import eval_sums, summarize

    split = manifest["splits"]["test"]
    try:
        sums = eval_sums(model, eval_batches(data_dir, split["count"], torch_device), noise=corruption)
    except (OSError, ValueError) as err:
        reason = " ".join(str(err).split()) or type(err).__name__
        raise UserError(
            f"cannot read {data_dir / 'test.beton'} ({reason}): "
            f"re-run `python -m data_prep --out {data_dir} --source ... --force`"
        ) from None
    metrics = summarize(sums, split["bce_floor"], noisy=corruption is not None)
    result: dict[str, Any] = {
        "test_bce": metrics["bce"],
        "test_bce_floor": metrics["bce_floor"],
        "test_bce_excess": metrics["bce_excess"],
        "test_mse": metrics["mse"],
        "test_psnr_db": metrics["psnr_db"],
    }
    if corruption is not None:
        result["noisy_psnr_db"] = metrics["noisy_psnr_db"]
        result["denoise_gain_db"] = metrics["denoise_gain_db"]
    result["test_images"] = split["count"]
    result["noise"] = str(corruption) if corruption is not None else None
    return result


def _json_safe(value: Any) -> Any:
    """inf/nan → strings, so the line is strict JSON (PSNR is inf for a perfect reconstruction)."""
    return str(value) if isinstance(value, float) and not math.isfinite(value) else value


@friendly_errors
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result = evaluate(args.model, args.data, args.noise, args.device, args.verify_data)
    print(json.dumps({k: _json_safe(v) for k, v in result.items()}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
