"""cae-train: a convolutional autoencoder on CIFAR-10, trained with FFCV and Accelerate."""

from ae.interrupt import started_as_module, stop_on_signals

if started_as_module():  # `python -m ae.TOOL`: Ctrl-C is one line from the first moment (ae.interrupt)
    stop_on_signals()
