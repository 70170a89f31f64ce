"""Train the CIFAR-10 convolutional autoencoder.

    accelerate launch [--config_file accelerate_config.yaml] train.py --data DIR --out OUT [flags]
    python train.py --data DIR --out OUT [flags]          # one device, no launcher

Rerunning the same command with the same --out resumes from the latest checkpoint.
`python train.py --help` lists the flags; the defaults are the study's recipe.
"""

from ae.launch import end_with_parent, relaunch_cpu_processes_if_needed

end_with_parent()  # no orphaned trainers: a launcher's child ends when the launcher does
relaunch_cpu_processes_if_needed()  # before the heavy imports: it may replace this process

from ae.config import parse_args  # noqa: E402
from ae.errors import friendly_errors  # noqa: E402


@friendly_errors
def main() -> None:
    cfg = parse_args()  # bad flags fail fast, before the heavy imports below
    from ae.trainer import Trainer

    Trainer(cfg).fit()


if __name__ == "__main__":
    main()
