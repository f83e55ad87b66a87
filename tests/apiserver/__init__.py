"""A stand-in for kube-apiserver, for testing mfrctl against "a cluster" with the real kubernetes client.

No Kubernetes API server can run on these machines (no container runtime, no etcd), so this is a
real HTTP server on 127.0.0.1 that the kubernetes client and the kubeflow-training SDK talk to
through a kubeconfig; nothing in mfrctl is replaced.  It is written from the Kubernetes API
conventions (community/contributors/devel/sig-architecture/api-conventions.md) and the API
concepts pages, with Status reasons, codes, details and messages worded as kube-apiserver 1.29
words them where a client may read them, NOT from what mfrctl happens to send:

* schema.py: unknown fields, types and required fields against the Kubernetes 1.29 OpenAPI
  schemas (kubernetes-validate's files) and CRDs' structural schemas;
* selectors.py: labelSelector and fieldSelector;
* patches.py: json-patch, merge-patch, strategic-merge-patch, server-side apply;
* store.py: objects, the resourceVersion counter, the change history, garbage collection;
* resources.py: which kinds are served (optional APIs only while "installed") and discovery;
* rest.py: the verbs, with admission and validation in kube-apiserver's order;
* workloads.py: the training operator's and kubelets' parts, played for tests;
* server.py: ApiServer, the HTTP server and the helpers tests use.

Left out, as no CLI path here depends on them: CEL rules (x-kubernetes-validations), the Go
validation of built-in kinds beyond names, labels and required fields, defaults of built-in
kinds, bookmarks, Table output, aggregated discovery, protobuf, graceful pod deletion (a deleted
pod is gone at once), and controllers other than the garbage collector and the opt-in training
operator (no scheduler: a pod gets a node when a test moves it past Pending).
"""

from tests.apiserver.rest import TOKEN, Request
from tests.apiserver.server import ApiServer

__all__ = ["TOKEN", "ApiServer", "Request"]
