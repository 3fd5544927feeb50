"""The fast tier's model and input size, as `tl train` overrides: one list for tests and scripts.

timm's ``test_efficientnet`` (99k params, has BatchNorm), random init, 32 px, CPU, 2 epochs. No
imports: ``scripts/bench_scale.py`` loads this file without pytest or the test fixtures.
"""

TINY = [
    "backbone=timm",
    "backbone.name=test_efficientnet",
    "backbone.weights=none",
    "dataset=imagefolder",
    "dataset.image_size=32",
    "dataset.batch_size=8",
    "dataset.num_workers=0",
    "trainer.accelerator=cpu",
    "trainer.devices=1",
    "trainer.max_epochs=2",
    "trainer.log_every_n_steps=1",
]

#: commands that only extract features (tl fewshot, tl zeroshot): the tiny model, no trainer
TINY_FEATURES = [
    "backbone=timm",
    "backbone.name=test_efficientnet",
    "backbone.weights=none",
    "dataset.image_size=32",
    "dataset.batch_size=16",
    "dataset.num_workers=0",
    "device=cpu",
]
