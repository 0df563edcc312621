"""The autoencoder set up for a CPU: channels-last convs, folded upsample convs, Winograd for the wide 3×3 convs.

Together on the 2-core CPU measured (`benchmarks/bench_pipeline.py`, fp32): the real autoencoder's decode in ~0.6×
diffusers' time with the same weights, outputs agreeing to ~1e-5 of the largest value. Each step is its own
transform (`flux2.autoencoder.channels_last`, `upsample_conv`, `winograd`) and can be undone alone.
"""

from flux2.autoencoder import AutoEncoder, channels_last
from flux2.transforms.upsample_conv import fold_upsample_convs
from flux2.transforms.winograd import winograd_convs


def cpu_autoencoder(ae: AutoEncoder) -> AutoEncoder:
    """All three, in place."""
    return winograd_convs(fold_upsample_convs(channels_last(ae)))
