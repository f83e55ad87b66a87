"""The small trainer configs of the tests and benchmarks, as ``--set`` overrides of the built-in demo.

Each trains in seconds on 2 CPU cores.  A test adds what it is about (its steps, switches and paths) where it
uses one; a later override wins, as on the command line.
"""

# In-process Trainers on 1-3 gloo ranks: 4-image batches read in the training process, a 2 x 2 held-out set not
# evaluated at start, and no checkpoint by steps (a test saves when it means to).
SHARDED = [
    "model.embedding_size=16", "data.images_per_identity=8", "data.batch_size=4", "data.num_workers=0",
    "eval.num_identities=2", "eval.images_per_identity=2", "eval.at_start=false", "optim.warmup_steps=1",
    "run.device=cpu", "checkpoint.every_steps=null",
]
# Checkpoints saved on one world size and loaded on another (support.training, test_checkpoint): 11 classes, which
# 2 and 3 ranks split unevenly.
CHECKPOINTED = [*SHARDED, "head.num_classes=11", "run.steps=6"]
