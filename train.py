"""Train the CIFAR-10 convolutional autoencoder.

    accelerate launch [--config_file accelerate_config.yaml] train.py --data DIR --out OUT [flags]
    python train.py --data DIR --out OUT [flags]          # one device, no launcher

Rerunning the same command with the same --out resumes from the latest checkpoint.
`python train.py --help` lists the flags; the defaults are the study's recipe.
"""

from ae.config import parse_args
from ae.errors import friendly_errors
from ae.trainer import Trainer


@friendly_errors
def main() -> None:
    Trainer(parse_args()).fit()


if __name__ == "__main__":
    main()
