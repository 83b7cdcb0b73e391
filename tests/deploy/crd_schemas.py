"""Closed JSON schemas of the custom resources the chart renders beside core Kubernetes kinds,
which kubernetes-validate does not know: KEDA's ScaledObject and TriggerAuthentication
(keda.sh/v1alpha1, KEDA 2.x CRDs) and the Gateway API's GRPCRoute
(gateway.networking.k8s.io/v1, Gateway API 1.1+).  Only the fields the chart uses, with
their types from the CRDs; anything else fails, so a typo in a template cannot pass.
Strict validation of these kinds against their full CRDs is not done here (no network).
"""

from __future__ import annotations

_STR = {"type": "string", "minLength": 1}
_INT = {"type": "integer", "minimum": 0}
_STRINGS = {"type": "array", "items": {"type": "string"}}
_LABELS = {"type": "object", "additionalProperties": {"type": "string"}}
_METADATA = {"type": "object", "required": ["name"], "properties": {
    "name": _STR, "labels": _LABELS, "annotations": _LABELS}}


def _closed(properties: dict, required=()) -> dict:
    return {"type": "object", "additionalProperties": False, "properties": properties,
            "required": list(required)}


def _resource(api: str, kind: str, spec: dict) -> dict:
    return _closed({"apiVersion": {"const": api}, "kind": {"const": kind},
                    "metadata": _METADATA, "spec": spec},
                   required=["apiVersion", "kind", "metadata", "spec"])


# KEDA's redis scaler (keda.sh/docs/2.16/scalers/redis-lists): every metadata value a string.
_REDIS_METADATA = _closed({k: {"type": "string"} for k in (
    "address", "host", "port", "listName", "listLength", "activationListLength",
    "databaseIndex", "enableTLS", "unsafeSsl", "username")}, required=["listName"])

_HPA_POLICY = _closed({"type": {"enum": ["Pods", "Percent"]}, "value": {"type": "integer",
                       "minimum": 1}, "periodSeconds": {"type": "integer", "minimum": 1,
                                                         "maximum": 1800}},
                      required=["type", "value", "periodSeconds"])
_HPA_RULES = _closed({"stabilizationWindowSeconds": {"type": "integer", "minimum": 0,
                                                     "maximum": 3600},
                      "selectPolicy": {"enum": ["Max", "Min", "Disabled"]},
                      "policies": {"type": "array", "items": _HPA_POLICY}})

SCALED_OBJECT = _resource("keda.sh/v1alpha1", "ScaledObject", _closed({
    "scaleTargetRef": _closed({"apiVersion": _STR, "kind": _STR, "name": _STR},
                              required=["name"]),
    "minReplicaCount": _INT, "maxReplicaCount": {"type": "integer", "minimum": 1},
    "idleReplicaCount": _INT, "pollingInterval": {"type": "integer", "minimum": 1},
    "cooldownPeriod": _INT,
    "advanced": _closed({"horizontalPodAutoscalerConfig": _closed({
        "name": _STR, "behavior": _closed({"scaleUp": _HPA_RULES, "scaleDown": _HPA_RULES})}),
        "restoreToOriginalReplicaCount": {"type": "boolean"}}),
    "triggers": {"type": "array", "minItems": 1, "items": _closed({
        "type": {"const": "redis"}, "name": _STR, "metadata": _REDIS_METADATA,
        "authenticationRef": _closed({"name": _STR, "kind": {"enum": [
            "TriggerAuthentication", "ClusterTriggerAuthentication"]}}, required=["name"])},
        required=["type", "metadata"])},
}, required=["scaleTargetRef", "triggers"]))

TRIGGER_AUTHENTICATION = _resource("keda.sh/v1alpha1", "TriggerAuthentication", _closed({
    "secretTargetRef": {"type": "array", "minItems": 1, "items": _closed(
        {"parameter": _STR, "name": _STR, "key": _STR},
        required=["parameter", "name", "key"])}}, required=["secretTargetRef"]))

_PARENT_REF = _closed({"group": {"type": "string"}, "kind": _STR, "namespace": _STR,
                       "name": _STR, "sectionName": _STR,
                       "port": {"type": "integer", "minimum": 1, "maximum": 65535}},
                      required=["name"])
GRPC_ROUTE = _resource("gateway.networking.k8s.io/v1", "GRPCRoute", _closed({
    "parentRefs": {"type": "array", "minItems": 1, "items": _PARENT_REF},
    "hostnames": _STRINGS,
    "rules": {"type": "array", "minItems": 1, "items": _closed({
        "backendRefs": {"type": "array", "minItems": 1, "items": _closed({
            "name": _STR, "port": {"type": "integer", "minimum": 1, "maximum": 65535},
            "weight": _INT}, required=["name", "port"])}})},
}, required=["parentRefs", "rules"]))

SCHEMAS = {("keda.sh/v1alpha1", "ScaledObject"): SCALED_OBJECT,
           ("keda.sh/v1alpha1", "TriggerAuthentication"): TRIGGER_AUTHENTICATION,
           ("gateway.networking.k8s.io/v1", "GRPCRoute"): GRPC_ROUTE}


def schema_of(doc: dict) -> dict | None:
    """The schema of a custom resource the chart renders, or None for any other kind."""
    return SCHEMAS.get((doc.get("apiVersion"), doc.get("kind")))
