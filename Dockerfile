# The trainer image that charts/mfr-trainer runs (see README "Run on Kubernetes"):
#   docker build -t registry.example.com/mfr-trainer:0.1.0 . && docker push registry.example.com/mfr-trainer:0.1.0
# torch comes from the official PyTorch CUDA runtime base, so it matches the
# base's CUDA; pip keeps it (mfr[train] needs torch>=2.5).  Pick a base whose
# torch matches the one the project is tested with and your nodes' driver.
ARG BASE_IMAGE=pytorch/pytorch:2.13.0-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /opt/mfr
COPY pyproject.toml README.md ./
COPY trainer ./trainer
COPY ctl ./ctl
COPY charts ./charts
RUN python -m pip install ".[train]" && rm -rf /opt/mfr/build

# The chart runs pods as this user (podSecurityContext.runAsUser/fsGroup 1000)
# with /workspace, an emptyDir or a PVC, as the working directory.
RUN groupadd --gid 1000 mfr \
    && useradd --uid 1000 --gid 1000 --create-home mfr \
    && mkdir -p /workspace && chown mfr:mfr /workspace
USER 1000:1000
WORKDIR /workspace

# The chart's pod command; torchrun (also on the PATH) takes every flag from
# the operator's PET_* environment.  No credentials live in the image: S3 keys
# come from a Kubernetes Secret at run time.
CMD ["python", "-m", "mfr.trainer.launch", "--config", "/etc/mfr/config.yaml"]
