"""Records as the API and the outbound events show them: one JSON form for both."""

from __future__ import annotations

from typing import Any

from receiver.models import AssetRecord, TaskRecord

__all__ = ["asset_json", "task_json"]


def asset_json(asset: AssetRecord) -> dict[str, Any]:
    return {
        "kind": asset.kind,
        "index": asset.index,
        "variant": asset.variant,
        "group_id": asset.group_id,
        "url": asset.url,
        "state": asset.state,
        "location": asset.location,
        "sha256": asset.sha256,
        "size": asset.size,
        "content_type": asset.content_type,
        "attempts": asset.attempts,
        "error": asset.error,
        "stored_at": asset.stored_at,
    }


def task_json(task: TaskRecord) -> dict[str, Any]:
    return {
        "task_id": task.task_id,
        "action": task.action,
        "status": task.status,
        "status_msg": task.status_msg,
        "external_task_id": task.external_task_id,
        "created_at": task.created_at,
        "updated_at": task.updated_at,
        "kling_updated_at": task.kling_updated_at,
        "learned_from": task.terminal_source,
        "updates": task.updates,
        "polls": task.polls,
        "flag": task.flag,
        "archived": task.archived,
        "archived_at": task.archived_at,
        "assets": [asset_json(asset) for asset in task.assets],
    }
