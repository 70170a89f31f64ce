"""cae-train: a convolutional autoencoder on CIFAR-10, trained with FFCV and Accelerate."""
