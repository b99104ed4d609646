"""A staged job's AsyncResult works like a direct one's with Celery's Redis result backend."""

from __future__ import annotations

from sqlalchemy.orm import Session


def test_async_result_get_returns_the_staged_jobs_result(
    services, celery_app, engine, redis_url, monkeypatch
):
    """`.get()` on the AsyncResult of a staged job returns its result (the subscription is lazy)."""
    from tests.apps.celery_app import record

    backend_url = redis_url.rsplit("/", 1)[0] + "/1"
    services.extra_env["RJ_TEST_RESULT_BACKEND"] = backend_url
    monkeypatch.setattr(celery_app.conf, "result_backend", backend_url)
    monkeypatch.setattr(celery_app, "_backend_cache", None)
    monkeypatch.delattr(celery_app._local, "backend", raising=False)
    worker = services.worker()
    with Session(engine) as session:
        result = record.apply_async(("with-result",), reliable_job_session=session)
        session.commit()
    assert result.get(timeout=60) == "with-result"
    services.stop(worker)
    celery_app.backend.client.close()
