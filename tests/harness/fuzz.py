"""Schema fuzzing of a server's routes from the OpenAPI document it publishes."""

from __future__ import annotations


def fuzz_openapi(url: str, max_examples: int = 20, timeout: float = 30.0,
                 headers: dict[str, str] | None = None) -> list[str]:
    """Drive every operation of the OpenAPI document at `url` with schemathesis, bodies and
    queries valid and not: each answer must be a documented code, never a 5xx, within
    `timeout`. `headers` go with every request (the control token, so the fuzz reaches the
    parsers behind the gate). Returns the failures, one line each (empty: all held).

    Written against schemathesis' strategies rather than its pytest plugin, whose lazy
    loader does not work with pytest 9.
    """
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis.checks import content_type_conformance, status_code_conformance

    schema = schemathesis.openapi.from_url(url)
    failures: list[str] = []
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in schemathesis.GenerationMode:
            @settings(max_examples=max_examples, deadline=None, database=None,
                      suppress_health_check=list(HealthCheck), print_blob=False)
            @given(case=operation.as_strategy(generation_mode=mode))
            def check(case: schemathesis.Case) -> None:
                response = case.call(timeout=timeout, headers=headers)
                documented = case.operation.definition.raw.get("responses", {})
                assert response.status_code < 500 or str(response.status_code) in documented, \
                    f"{response.status_code} {response.text[:200]}"
                case.validate_response(response, checks=[status_code_conformance,
                                                         content_type_conformance])

            try:
                check()
            except Unsatisfiable:
                pass  # nothing to get wrong: a route without parameters or body
            except (Exception, BaseExceptionGroup) as exc:  # one line each, then the next
                first = str(exc).strip().splitlines()[:6]
                failures.append(f"{operation.label} ({mode.value}): {type(exc).__name__}: "
                                + " / ".join(first))
    return failures
