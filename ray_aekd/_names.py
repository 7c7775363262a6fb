"""The names a config may use, as plain tuples: datasets, weighting strategies, gradient spaces,
teacher source kinds and the built-in models.

The configuration (``ray_aekd.config``) checks names against these without importing torch, so
that ``ray-aekd <command> --check`` is instant; the modules that implement the names (the data
sources, the weighting, the teacher sources) use the same tuples, and tests/test_config_reference.py
checks that the model registry registers exactly ``BUILTIN_MODELS``. Standard library only.
"""

from __future__ import annotations

__all__ = [
    "BUILTIN_MODELS",
    "DATASETS",
    "GRADIENT_SPACES",
    "SOURCE_KINDS",
    "GRADIENT_STRATEGIES",
    "MIN_NORM_STRATEGIES",
    "STRATEGIES",
    "TIMM_PREFIX",
    "TOLERANCE_STRATEGIES",
    "TORCHVISION_PREFIX",
    "unknown_model_message",
]

#: ``data.dataset``: the data sources (``ray_aekd.data.sources.SOURCES``).
DATASETS = ("digits", "cifar10", "cifar100", "imagefolder")

#: ``distill.strategy`` (``ray_aekd.core.weighting.strategy_weights``): ``average`` is the uniform
#: mean of the teachers' KD losses; ``aekd`` the min-norm point with tolerance C; ``mgda`` C = 1;
#: ``upgrad`` UPGrad's projected mean; ``authors_svm`` the AE-KD authors' released solver (a
#: baseline); ``fixed`` the weights in ``distill.weights``; ``none`` no KD term (cross-entropy only).
STRATEGIES = ("average", "aekd", "mgda", "upgrad", "authors_svm", "fixed", "none")

#: The min-norm family, spanned by one tolerance C (1/M, C, 1); ``ray-aekd demo`` compares these.
MIN_NORM_STRATEGIES = ("average", "aekd", "mgda")

#: The strategies that read the tolerance C.
TOLERANCE_STRATEGIES = ("aekd", "authors_svm")

#: The strategies that solve for weights from the teachers' gradients (they need M >= 2).
GRADIENT_STRATEGIES = ("aekd", "mgda", "upgrad", "authors_svm")

#: ``distill.space``: how a teacher's gradient becomes a vector (``ray_aekd.core.weighting``).
GRADIENT_SPACES = ("batch_mean", "per_sample")

#: The keys that name a teacher's model, in configs (``teachers.<i>.<kind>``) and for ``--model``
#: (``ray_aekd.models.sources.SOURCE_KINDS``).
SOURCE_KINDS = ("checkpoint", "model", "exported", "torchscript", "mlflow")

#: The models ``ray_aekd.models.registry`` registers itself, in its order.
BUILTIN_MODELS = (
    *(f"resnet{depth}" for depth in (8, 14, 20, 32, 56, 110)),
    "resnet8x4",
    "resnet32x4",
    "wrn_16_2",
    "wrn_40_2",
    "vgg8",
    "vgg13",
    "mobilenetv2",
    "shufflenetv2",
    "small_cnn8",
    "small_cnn16",
    "small_cnn32",
    "digits_mlp",
    "digits_cnn",
)

#: Model names that start with these are the libraries' models (``torchvision:resnet18``).
TORCHVISION_PREFIX = "torchvision:"
TIMM_PREFIX = "timm:"


def unknown_model_message(name: str, valid: tuple[str, ...]) -> str:
    """What an unknown model name is told (the registry and the config say the same)."""
    return (
        f"Unknown model {name!r}. Valid models: {', '.join(valid)}, or "
        f"'{TORCHVISION_PREFIX}<name>' for any torchvision classification model, or '{TIMM_PREFIX}<name>' for any "
        "timm model."
    )
