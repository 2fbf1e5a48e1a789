"""Settings shared by the pretraining tests (fixtures ``tiny_train``/``tiny_val``: tests/conftest.py)."""

TINY = ["model.arch=resnet18", "model.proj_hidden_dim=64", "model.proj_dim=32",
        "data.image_size=32", "data.batch_size=8", "data.workers=0", "train.log_every=1",
        "optim.base_lr=1.0", "optim.warmup_epochs=0"]
