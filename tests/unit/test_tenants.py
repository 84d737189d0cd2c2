"""Tenants' configuration, the keys that name them, and the fingerprint that tells a repeated
submission from a different one (no fleet needed)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from fleet.run.usage import seconds_to_day_end, utc_day
from fleet.scheduling.submission import Submission, fingerprint
from fleet.settings import Settings
from fleet.surfaces.views import tenant_rows
from fleet.tenants import DEFAULT_TENANT, OPERATOR, Caller, Quotas

TENANTS = ('[{"name": "acme", "weight": 3, "keys": ["acme-1", "acme-2"], "quotas": {"max_active_batch": 10,'
           ' "submissions_per_s": 5}}, {"name": "globex", "keys": ["globex-1"]}]')


def _settings(**kw: object) -> Settings:
    return Settings(_env_file=None, **kw)


def test_keys_name_their_tenant_operators_and_the_default_tenant():
    registry = _settings(tenants=TENANTS, api_keys="plain", admin_keys="ops").tenant_registry
    assert registry.names() == ["acme", "default", "globex"]
    assert registry.caller("acme-2") == Caller("acme") and registry.caller("globex-1") == Caller("globex")
    assert registry.caller("plain") == Caller(DEFAULT_TENANT)
    assert registry.caller("ops") == OPERATOR and OPERATOR.sees("acme") and OPERATOR.sees("globex")
    assert registry.caller("acme-") is None and registry.caller("") is None and registry.caller(None) is None
    assert registry.weight("acme") == 3 and registry.weight("globex") == 1
    assert Caller("acme").sees("acme") and not Caller("acme").sees("globex")
    assert Caller(DEFAULT_TENANT).sees(None)  # records from before tenants are the default tenant's
    assert registry.has_keys and not _settings().tenant_registry.has_keys


def test_a_tenants_file_is_read_beside_the_variable(tmp_path):
    path = tmp_path / "tenants.toml"
    path.write_text('[[tenants]]\nname = "initech"\nweight = 2\nkeys = ["ini-1"]\n'
                    '[tenants.quotas]\ntokens_per_day = 1000\n')
    registry = _settings(tenants=TENANTS, tenants_file=path).tenant_registry
    assert registry.caller("ini-1") == Caller("initech")
    assert registry.get("initech").quotas.tokens_per_day == 1000
    path.write_text('{"tenants": [{"name": "initech", "keys": ["ini-2"]}]}')
    json_path = path.rename(tmp_path / "tenants.json")
    assert _settings(tenants_file=json_path).tenant_registry.caller("ini-2") == Caller("initech")


@pytest.mark.parametrize("kw, message", [
    ({"tenants": '[{"name": "Acme"}]'}, "tenant Acme: name"),
    ({"tenants": '[{"name": "a", "weight": 0}]'}, "tenant a: weight"),
    ({"tenants": '[{"name": "a", "quota": {}}]'}, "tenant a: quota"),
    ({"tenants": '[{"name": "a"}, {"name": "a"}]'}, "tenant names must differ"),
    ({"tenants": '[{"name": "a", "keys": ["k"]}]', "admin_keys": "k"}, "also another tenant's"),
    ({"tenants": "{not json"}, "not a JSON list"),
    ({"tenant": "nobody"}, "FLEET_TENANT: unknown tenant 'nobody'"),
])
def test_bad_tenant_configuration_fails_at_load_naming_what_is_wrong(kw, message):
    with pytest.raises(ValidationError, match=message):
        _settings(**kw)


def test_a_missing_tenants_file_fails_at_load(tmp_path):
    with pytest.raises(ValidationError, match="cannot read"):
        _settings(tenants_file=tmp_path / "absent.json")


def test_a_copy_with_other_keys_names_other_callers():
    base = _settings(api_keys="one")
    other = base.model_copy(update={"api_keys": "two"})
    assert base.tenant_registry.caller("one") and not base.tenant_registry.caller("two")
    assert other.tenant_registry.caller("two") and not other.tenant_registry.caller("one")


def test_keys_are_not_shown_with_the_settings():
    text = repr(_settings(tenants=TENANTS, admin_keys="ops-secret"))
    assert "acme-1" not in text and "ops-secret" not in text


def test_the_fingerprint_tells_a_different_submission_from_a_repeat():
    one = Submission(agent="writer", input={"topic": "queues"}, priority="batch", idempotency_key="k1")
    same = Submission(agent="writer", input={"topic": "queues"}, priority="batch", idempotency_key="k2")
    other_input = Submission(agent="writer", input={"topic": "locks"}, priority="batch", idempotency_key="k1")
    other_class = Submission(agent="writer", input={"topic": "queues"}, idempotency_key="k1")
    assert fingerprint(one) == fingerprint(same)
    assert fingerprint(one) != fingerprint(other_input) and fingerprint(one) != fingerprint(other_class)


def test_quota_burst_defaults_to_a_seconds_worth():
    assert Quotas(submissions_per_s=50).burst() == 50
    assert Quotas(submissions_per_s=0.5).burst() == 1
    assert Quotas(submissions_per_s=5, submissions_burst=100).burst() == 100


def test_the_tokens_day_is_utc():
    assert utc_day(86400 * 3 + 5) == "19700104" and seconds_to_day_end(86400 * 3 + 5) == 86395


def test_tenant_rows_share_batch_model_time_and_scope_to_one_tenant():
    report = tenant_rows({"a": (3.0, Quotas()), "b": (1.0, Quotas(max_active_batch=4))},
                         {("a", "batch"): 7, ("b", "batch"): 2, ("gone", "interactive"): 1}, {"a": 5},
                         {("a", "batch"): 30.0, ("b", "batch"): 10.0, ("b", "interactive"): 4.0},
                         {"b": 120}, 900.0)
    rows = {r.name: r for r in report.tenants}
    assert set(rows) == {"a", "b", "gone"}
    assert rows["a"].batch_share == 0.75 and rows["b"].batch_share == 0.25 and rows["gone"].batch_share == 0
    assert rows["a"].active == {"interactive": 0, "batch": 7} and rows["a"].backlog == 5
    assert rows["b"].tokens_today == 120 and rows["b"].quotas.max_active_batch == 4
    only = tenant_rows({"a": (3.0, Quotas())}, {("b", "batch"): 2}, {}, {}, {}, 900.0, only="a")
    assert [r.name for r in only.tenants] == ["a"]
