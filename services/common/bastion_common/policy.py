"""Who may do what: the declarative policy, evaluated here and nowhere else.

Roles grant permissions and a model allow-list; tenants narrow the models; an
API key may narrow them further. A refusal names the missing permission (or
the model), never the policy's internals.

Everything a principal manages or reads is its own tenant's: keys, audit rows.
Only ``platform:admin``, which no default role grants, spans tenants; it is
for the operator of the deployment, in a role the operator adds.
"""

from __future__ import annotations

import fnmatch
import tomllib
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from bastion_common.errors import PermissionDeniedError
from bastion_common.tokens import Principal

PLATFORM = "platform:admin"  # spans tenants
PERMISSIONS = frozenset(
    {
        "chat",
        "completions",
        "generate",
        "models:list",
        "audit:read",
        "keys:admin",
        "metrics:read",
        PLATFORM,
    }
)
# Permissions a key may carry only when the platform operator mints it: a
# tenant's administrator must not create more administrators.
DELEGATED_BY_PLATFORM_ONLY = frozenset({"keys:admin", PLATFORM})


@dataclass(frozen=True, slots=True)
class Limits:
    """0 means unlimited."""

    requests_per_minute: int = 0
    tokens_per_minute: int = 0
    concurrent_requests: int = 0
    daily_tokens: int = 0


Action = Literal["block", "flag", "off"]
FAMILIES = ("injection", "smuggling", "flooding", "exfiltration", "anomaly", "sanitise")


@dataclass(frozen=True, slots=True)
class GuardRules:
    """What the guard does for one tenant. ``actions`` maps a finding family
    (the part of a finding's kind before the dot) to block, flag or off."""

    actions: dict[str, Action] = field(
        default_factory=lambda: {
            "injection": "block",
            "smuggling": "block",
            "flooding": "block",
            "exfiltration": "block",
            "anomaly": "flag",
            "sanitise": "flag",
        }
    )
    block_threshold: float = 0.5
    flag_threshold: float = 0.3
    # PII and secrets in output: redact them, only record them (flag), or skip the scan.
    pii: Literal["redact", "flag", "off"] = "redact"
    redaction: Literal["label", "mask", "pseudonym"] = "label"

    def action(self, kind: str) -> Action:
        # Unknown families are blocked: a new detector fails closed until configured.
        return self.actions.get(kind.split(".", 1)[0], "block")

    @classmethod
    def parse(cls, spec: dict[str, Any], base: GuardRules | None = None) -> GuardRules:
        base = base or cls()
        actions = dict(base.actions)
        for family, action in spec.get("actions", {}).items():
            if family not in FAMILIES or action not in ("block", "flag", "off"):
                raise ValueError(f"guard action {family!r} = {action!r} is not understood")
            actions[family] = action
        return cls(
            actions,
            float(spec.get("block_threshold", base.block_threshold)),
            float(spec.get("flag_threshold", base.flag_threshold)),
            spec.get("pii", base.pii),
            spec.get("redaction", base.redaction),
        )


@dataclass(frozen=True, slots=True)
class Role:
    permissions: frozenset[str]
    models: tuple[str, ...]
    max_tokens: int


@dataclass(frozen=True, slots=True)
class Policy:
    roles: dict[str, Role]
    tenant_models: dict[str, tuple[str, ...]]
    principal_limits: Limits = field(default_factory=Limits)
    tenant_limits: Limits = field(default_factory=Limits)
    # Per-tenant overrides: tenant -> (limits per principal, limits of the tenant).
    tenant_overrides: dict[str, tuple[Limits, Limits]] = field(default_factory=dict)
    guard_default: GuardRules = field(default_factory=GuardRules)
    guard_tenants: dict[str, GuardRules] = field(default_factory=dict)
    # Bastion role -> the identity provider's role or group values that grant it,
    # in the policy's order (the first match wins). Without an [identity] section,
    # each role is granted by its own name.
    identity_roles: dict[str, frozenset[str]] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path | None = None) -> Policy:
        """The policy at ``path``, or the default shipped with Bastion."""
        if path is None:
            text = resources.files("bastion_common").joinpath("data/policy.toml").read_text()
        else:
            text = path.read_text()
        return cls.parse(tomllib.loads(text))

    @classmethod
    def parse(cls, doc: dict[str, Any]) -> Policy:
        roles = {}
        for name, spec in doc.get("roles", {}).items():
            unknown = set(spec.get("permissions", [])) - PERMISSIONS
            if unknown:
                raise ValueError(f"role {name!r} names unknown permissions {sorted(unknown)}")
            roles[name] = Role(
                frozenset(spec.get("permissions", [])),
                tuple(spec.get("models", [])),
                int(spec.get("max_tokens", 0)),
            )
        tenants = {n: tuple(s.get("models", [])) for n, s in doc.get("tenants", {}).items()}
        limits = doc.get("limits", {})
        principal, tenant = (
            Limits(**limits.get("principal", {})),
            Limits(**limits.get("tenant", {})),
        )
        overrides = {
            name: (
                Limits(**{**asdict(principal), **spec["limits"].get("principal", {})}),
                Limits(**{**asdict(tenant), **spec["limits"].get("tenant", {})}),
            )
            for name, spec in doc.get("tenants", {}).items()
            if "limits" in spec
        }
        guard_doc = doc.get("guard", {})
        guard = GuardRules.parse(guard_doc)
        guard_tenants = {
            name: GuardRules.parse(spec, guard)
            for name, spec in guard_doc.get("tenants", {}).items()
        }
        mapped = doc.get("identity", {}).get("roles")
        identity = (
            {name: frozenset({name}) for name in roles}
            if mapped is None
            else {role: frozenset(values) for role, values in mapped.items()}
        )
        unknown_roles = set(identity) - set(roles)
        if unknown_roles:
            raise ValueError(f"[identity.roles] names unknown roles {sorted(unknown_roles)}")
        return cls(roles, tenants, principal, tenant, overrides, guard, guard_tenants, identity)

    def guard(self, tenant: str) -> GuardRules:
        return self.guard_tenants.get(tenant, self.guard_default)

    def limits(self, principal: Principal) -> tuple[Limits, Limits]:
        """(limits per principal, limits of the whole tenant) for this principal."""
        default = (self.principal_limits, self.tenant_limits)
        return self.tenant_overrides.get(principal.tenant, default)

    def role(self, principal: Principal) -> Role:
        return self.roles.get(principal.role) or Role(frozenset(), (), 0)

    def permissions(self, principal: Principal) -> frozenset[str]:
        """What ``principal`` may do: its role's permissions, narrowed by its key's."""
        granted = self.role(principal).permissions
        return granted if principal.permissions is None else granted & principal.permissions

    def spans_tenants(self, principal: Principal) -> bool:
        return PLATFORM in self.permissions(principal)

    def require_tenant(self, principal: Principal, tenant: str) -> None:
        """Refuse anything outside ``principal``'s own tenant, but for the operator."""
        if tenant != principal.tenant and not self.spans_tenants(principal):
            raise PermissionDeniedError(
                "This credential may act only within its own tenant.", code="tenant_not_allowed"
            )

    def require_mintable(
        self, principal: Principal, role: str, permissions: tuple[str, ...] | None
    ) -> None:
        """Refuse a key above its creator: a permission the creator lacks, a higher
        ``max_tokens`` ceiling, or the power to manage keys. The operator
        (``platform:admin``) is above every role and may mint any."""
        target = self.roles.get(role)
        if target is None:
            raise PermissionDeniedError(f"There is no role '{role}'.", code="role_not_allowed")
        if self.spans_tenants(principal):
            return
        # What the key would hold, and what its list names (a name the role does
        # not grant is refused too, rather than silently dropped).
        asked = target.permissions if permissions is None else frozenset(permissions)
        above = (asked - self.permissions(principal)) | (asked & DELEGATED_BY_PLATFORM_ONLY)
        if above or target.max_tokens > self.role(principal).max_tokens:
            detail = f": {', '.join(sorted(above))}" if above else ""
            raise PermissionDeniedError(
                f"A key may not carry more than its creator may do{detail}.",
                code="role_not_allowed",
            )

    def require(self, principal: Principal, permission: str) -> None:
        if permission not in self.role(principal).permissions:
            raise PermissionDeniedError(
                f"This credential lacks the permission '{permission}'.",
                code="missing_permission",
            )
        if principal.permissions is not None and permission not in principal.permissions:
            raise PermissionDeniedError(
                f"This API key lacks the permission '{permission}'.", code="missing_permission"
            )

    def allows_model(self, principal: Principal, model: str) -> bool:
        tenant = self.tenant_models.get(principal.tenant, self.tenant_models.get("*", ("*",)))
        lists = [self.role(principal).models, tenant]
        if principal.models is not None:
            lists.append(principal.models)
        return all(any(fnmatch.fnmatchcase(model, p) for p in allowed) for allowed in lists)

    def require_model(self, principal: Principal, model: str) -> None:
        if not self.allows_model(principal, model):
            raise PermissionDeniedError(
                f"This credential may not use the model '{model}'.",
                param="model",
                code="model_not_allowed",
            )

    def max_tokens(self, principal: Principal) -> int:
        return self.role(principal).max_tokens
