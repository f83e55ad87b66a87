"""The REST collections of namespace ml where mfrctl's cluster commands put a run, as the API stand-in keys them."""

JOBS = "/apis/kubeflow.org/v1/namespaces/ml/pytorchjobs"
CONFIGMAPS = "/api/v1/namespaces/ml/configmaps"
NETPOLS = "/apis/networking.k8s.io/v1/namespaces/ml/networkpolicies"
PODMONITORS = "/apis/monitoring.coreos.com/v1/namespaces/ml/podmonitors"
PROMETHEUSRULES = "/apis/monitoring.coreos.com/v1/namespaces/ml/prometheusrules"
PODS = "/api/v1/namespaces/ml/pods"
