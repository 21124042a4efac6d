"""The API's campaign endpoints: a CSV campaign posted, followed, and its report.

``POST /v1/campaigns`` takes a JSON object: ``name`` (letters, digits, ``.``, ``_``, ``-``),
``template`` (a message template, as ``twistmail send`` reads it), ``csv`` (the recipients
CSV's text), ``attachments`` (``[{"filename", "content"}]``, base64: the files the template's
``Attachment:`` lines name) and optionally ``from`` (the envelope sender). It is checked as
``twistmail check`` checks a campaign, in the sandbox the workers render it in: any problem is
422, listing every row problem (``problems``: ``row``, ``email``, ``detail``), and nothing is
queued; an ``Attachment:`` naming a file that was not uploaded is 422 (a posted template never
reads a file path). Otherwise the campaign is stored in the queue (see
:mod:`twistmail.queue.campaigns`): 202 with its id and what was queued. Posting the same
campaign again (same name and template) queues only the rows not queued before, as running
``twistmail send`` again does; another template under that name is 409.

``GET /v1/campaigns/{name}``: rows by state, the rate of the last minute and an ETA.
``GET /v1/campaigns/{name}/report``: the report CSV (``twistmail send``'s columns).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Callable
from typing import Any, Final

from twisted.internet import defer, threads
from twisted.web.iweb import IRequest

from ..errors import TemplateError, TwistmailError
from ..interfaces import IQueue
from ..queue.campaigns import FIRST, Campaign, CampaignChanged, CampaignSpec, CampaignStatus
from ..unsubscribe.headers import Unsubscribe
from .messages import Problem, json_object
from .problems import problem

__all__ = ["MAX_PROBLEMS", "campaign_routes"]

MAX_PROBLEMS: Final = 1000
"""Row problems listed in a 422 (``problem_count`` says how many there are)."""
_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
_FIELDS: Final = frozenset({"name", "template", "csv", "attachments", "from"})
_PAGE: Final = 5000

Route = tuple[str, str, Callable[..., "defer.Deferred[bytes]"]]


class _Refused(Problem):
    """A :class:`Problem` with more members for its answer (the rows' problems)."""

    def __init__(self, status: int, detail: str, field: str | None = None, **more: Any) -> None:
        super().__init__(status, detail, field)
        self.more = more


def _request(body: bytes) -> dict[str, Any]:
    """The campaign request's fields, checked for shape; :class:`Problem` otherwise."""
    parsed = json_object(body)
    unknown = set(parsed) - _FIELDS
    if unknown:
        raise _Refused(422, f"unknown field {min(unknown)!r}", min(unknown))
    name = parsed.get("name")
    if not isinstance(name, str) or _NAME.fullmatch(name) is None:
        raise _Refused(422, "name must be 1 to 100 letters, digits, '.', '_' or '-'", "name")
    for field in ("template", "csv"):
        if not isinstance(parsed.get(field), str) or not parsed[field]:
            raise _Refused(422, f"{field} is required: a non-empty string", field)
    sender = parsed.get("from")
    if sender is not None and not isinstance(sender, str):
        raise _Refused(422, "from must be a string", "from")
    files: dict[str, bytes] = {}
    attachments = parsed.get("attachments", [])
    if not isinstance(attachments, list):
        raise _Refused(422, "attachments must be a list", "attachments")
    for i, item in enumerate(attachments):
        field = f"attachments[{i}]"
        if not isinstance(item, dict) or set(item) - {"filename", "content"}:
            raise _Refused(422, "an attachment is an object of filename and content", field)
        filename, content = item.get("filename"), item.get("content")
        if not isinstance(filename, str) or not filename.strip() or "\x00" in filename:
            raise _Refused(422, "filename must be a non-empty name", f"{field}.filename")
        if not isinstance(content, str):
            raise _Refused(422, "content must be a base64 string", f"{field}.content")
        try:
            files[filename] = base64.b64decode(content, validate=True)
        except (binascii.Error, ValueError):
            raise _Refused(422, "content is not valid base64", f"{field}.content") from None
    return {
        "name": name,
        "template": parsed["template"],
        "csv": parsed["csv"],
        "from": sender or None,
        "files": files,
    }


def _checked(fields: dict[str, Any], directory: str) -> tuple[Any, Any, CampaignSpec]:
    """The campaign's CSV and sandboxed template, checked as ``twistmail check`` checks them
    (blocking: run in a thread); :class:`_Refused` listing every problem otherwise."""
    from ..merge.attachments import StoredAttachments, attachment_name
    from ..merge.csvsource import open_csv
    from ..merge.prepare import problems
    from ..merge.template import MessageTemplate

    files = {attachment_name(name): data for name, data in fields["files"].items()}
    try:
        template = MessageTemplate(
            fields["template"],
            name="template",
            sandboxed=True,
            attachments=StoredAttachments(files),
        )
    except TwistmailError as e:
        raise _Refused(422, str(e), "template") from None
    for path in template.literal_attachments:
        if attachment_name(path) not in files:
            raise _Refused(
                422,
                f"Attachment: {path!r} was not uploaded (a template sent to the API reads no "
                "file path: upload the file in attachments)",
                "template",
            )
    path = os.path.join(directory, "campaign.csv")
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write(fields["csv"])
    try:
        source = open_csv(path)
        template.check_columns(source.columns)
        found: list[dict[str, Any]] = []
        count = 0
        for p in problems(source, template, fields["from"]):
            count += 1
            if len(found) < MAX_PROBLEMS:
                found.append({"row": p.row, "email": p.email, "detail": p.reason})
    except TwistmailError as e:
        field = "template" if isinstance(e, TemplateError) else "csv"
        raise _Refused(422, str(e), field) from None
    if count:
        raise _Refused(
            422,
            f"{count} row(s) cannot be sent; nothing was queued",
            "csv",
            problems=found,
            problem_count=count,
        )
    spec = CampaignSpec(
        template.source,
        "template",
        source.columns,
        fields["from"],
        hashlib.sha256(template.source.encode("utf-8", "surrogatepass")).hexdigest(),
    )
    return source, template, spec


def _json(request: IRequest, body: Any, status: int = 200) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", b"application/json")
    request.setHeader(b"Cache-Control", b"no-store")
    return json.dumps(body).encode() + b"\n"


def _refusal(request: IRequest, refused: Problem) -> bytes:
    body = problem(request, refused.status, refused.detail, refused.field)
    more = getattr(refused, "more", None)
    if not more:
        return body
    return json.dumps({**json.loads(body), **more}).encode() + b"\n"


def status_json(progress: CampaignStatus) -> dict[str, Any]:
    """A campaign's progress as the API shows it."""
    campaign = progress.campaign
    return {
        "id": campaign.id,
        "name": campaign.name,
        "created_at": campaign.created_at,
        "total": progress.total,
        "counts": progress.counts,
        "changed": progress.changed,
        "rate_per_second": round(progress.rate, 3),
        "eta_seconds": None if progress.eta is None else round(progress.eta, 1),
    }


def campaign_routes(
    queue: IQueue, wake: Callable[[], None], unsubscribe: Unsubscribe | None = None
) -> list[Route]:
    """``(path, method, handler)`` of each campaign endpoint over ``queue`` (``wake()`` once
    rows are queued); with ``unsubscribe`` each row's message gets its ``List-Unsubscribe``
    headers (the relay's ``--unsubscribe-url``/``--unsubscribe-mailto``)."""

    async def post(request: IRequest) -> bytes:
        assert request.content is not None
        body = request.content.read()
        kind = (request.getHeader(b"content-type") or b"").split(b";")[0].strip().lower()
        if kind != b"application/json":
            return problem(request, 415, "send application/json", "Content-Type")
        try:
            fields = _request(body)
            with tempfile.TemporaryDirectory(prefix="twistmail-campaign-") as directory:
                source, template, spec = await threads.deferToThread(_checked, fields, directory)
                campaign = await queue.campaign_open(fields["name"], spec)
                done = await _store(queue, campaign, source, template, fields, unsubscribe)
        except Problem as refused:
            return _refusal(request, refused)
        except CampaignChanged as e:
            return problem(request, 409, str(e), "template")
        if done.queued:
            wake()
        request.setHeader(b"Location", f"/v1/campaigns/{campaign.name}".encode())
        answer = {
            "id": campaign.id,
            "name": campaign.name,
            "queued": done.queued,
            "already_queued": done.held,
            "settled_before": done.settled,
        }
        return _json(request, answer, 202)

    def show_campaign(request: IRequest, name: str) -> defer.Deferred[bytes]:
        def found(statuses: list[CampaignStatus]) -> bytes:
            if not statuses:
                return problem(request, 404, f"no campaign {name!r}", "name")
            return _json(request, status_json(statuses[0]))

        return queue.campaign_status(name, unsent=0).addCallback(found)

    async def report(request: IRequest, name: str) -> bytes:
        from ..merge.report import REPORT_HEADER

        campaign = await queue.campaign(name)
        if campaign is None:
            return problem(request, 404, f"no campaign {name!r}", "name")
        request.setHeader(b"Content-Type", b"text/csv; charset=utf-8")
        request.setHeader(b"Cache-Control", b"no-store")
        request.setHeader(
            b"Content-Disposition", f'attachment; filename="{campaign.name}.report.csv"'.encode()
        )
        request.write(_csv([REPORT_HEADER]))
        after = FIRST
        while True:
            lines, after = await queue.campaign_report(campaign.id, after, _PAGE)
            if not lines:
                return b""
            request.write(_csv(lines))

    def post_campaign(request: IRequest) -> defer.Deferred[bytes]:
        return defer.ensureDeferred(post(request))

    def campaign_report(request: IRequest, name: str) -> defer.Deferred[bytes]:
        return defer.ensureDeferred(report(request, name))

    return [
        ("/v1/campaigns", "POST", post_campaign),
        ("/v1/campaigns/<string:name>", "GET", show_campaign),
        ("/v1/campaigns/<string:name>/report", "GET", campaign_report),
    ]


async def _store(
    queue: IQueue,
    campaign: Campaign,
    source: Any,
    template: Any,
    fields: dict[str, Any],
    unsubscribe: Unsubscribe | None,
) -> Any:
    """Store the checked campaign's rows (rendered in a thread, a chunk at a time)."""
    from ..merge.attachments import attachment_name
    from ..merge.queued import enqueue_campaign

    await queue.campaign_forget(campaign.id)
    files = [{attachment_name(name): data for name, data in fields["files"].items()}]
    return await enqueue_campaign(
        queue,
        campaign,
        source,
        template,
        lambda: files.pop() if files else {},
        envelope_from=fields["from"],
        render=threads.deferToThread,
        unsubscribe=unsubscribe,
    )


def _csv(lines: Any) -> bytes:
    import csv
    import io

    out = io.StringIO()
    csv.writer(out, lineterminator="\r\n").writerows(lines)
    return out.getvalue().encode("utf-8")
