"""The small trainer configs of the tests and benchmarks, as ``--set`` overrides of the built-in demo.

Each trains in seconds on 2 CPU cores.  A test adds what it is about (its steps, switches and paths) where it
uses one; a later override wins, as on the command line.
"""

# In-process Trainers on 1-3 gloo ranks: 4-image batches read in the training process, a 2 x 2 held-out set not
# evaluated at start, and no checkpoint by steps (a test saves when it means to).
SHARDED = [
    "model.embedding_size=16",
    "data.images_per_identity=8",
    "data.batch_size=4",
    "data.num_workers=0",
    "eval.num_identities=2",
    "eval.images_per_identity=2",
    "eval.at_start=false",
    "optim.warmup_steps=1",
    "run.device=cpu",
    "checkpoint.every_steps=null",
]
# Checkpoints saved on one world size and loaded on another (support.training, test_checkpoint): 11 classes, which
# 2 and 3 ranks split unevenly.
CHECKPOINTED = [*SHARDED, "head.num_classes=11", "run.steps=6"]

# A 4-step run of 8 identities with a 4 x 2 held-out set, no metrics server and no checkpoint by steps (test_distill;
# test_eval_suite, evaluating every 2 of 5 steps).
SMALL = [
    "head.num_classes=8",
    "data.images_per_identity=4",
    "data.batch_size=8",
    "data.num_workers=0",
    "eval.num_identities=4",
    "eval.images_per_identity=2",
    "eval.at_start=false",
    "metrics.enabled=false",
    "checkpoint.every_steps=null",
    "model.embedding_size=16",
    "run.steps=4",
    "optim.warmup_steps=1",
]

# A whole job in seconds: 16 identities, 32-d embeddings, one FPR target, a step logged every 2 (test_elastic's static
# jobs, saving every 10 steps, and the shutdown runs below).
TINY_RUN = [
    "model.embedding_size=32",
    "head.num_classes=16",
    "data.images_per_identity=4",
    "data.batch_size=8",
    "run.log_every=2",
    "optim.warmup_steps=0",
    "eval.num_identities=4",
    "eval.images_per_identity=2",
    "eval.fprs=[0.1]",
    "eval.at_start=false",
]
# TINY_RUN saving asynchronously every 2 steps, data read in the training process: the runs whose exit is checked
# (test_shutdown: 4 steps, no metrics; benchmarks/stress_shutdown: longer, /metrics scraped, under load).
ASYNC_SAVES = [*TINY_RUN, "data.num_workers=0", "checkpoint.every_steps=2", "checkpoint.async_save=true"]

# The runs whose peak memory mfrctl plan's model is checked against (test_plan, benchmarks/bench_memory): one image
# per identity, data in the training process, a 2 x 2 held-out set, no metrics and no checkpoints; each adds a model.
MEMORY_MEASURED = [
    "data.num_workers=0",
    "data.images_per_identity=1",
    "eval.num_identities=2",
    "eval.images_per_identity=2",
    "metrics.enabled=false",
    "checkpoint.every_steps=null",
    "run.steps=10",
    "optim.warmup_steps=0",
]
