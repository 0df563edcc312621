"""Assets: a project's images, uploads, deletion, and the media files themselves (with Range support)."""

import json
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, File, Form, HTTPException, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse
from PIL import Image
from sqlalchemy import delete
from sqlmodel import col, select

from flux2.studio.api.deps import MediaDep, SessionDep
from flux2.studio.api.responses import AssetDeleted, GalleryImage, LibraryItem, Uploaded
from flux2.studio.records import Asset, Project

router = APIRouter(tags=["assets"])
media_router = APIRouter(tags=["media"])
# Media routes answer the file itself, with Range support.
MEDIA_FILE = {200: {"description": "The file (206 with a Range)",
                    "content": {"image/*": {"schema": {"type": "string", "format": "binary"}}}}}  # fmt: skip


@router.get("/projects/{project_id}/images", summary="A project's images, newest first (none for an unknown one)")
def project_images(project_id: str, session: SessionDep) -> list[GalleryImage]:
    # [] rather than 404: the front end lists the images of its built-in project before it is first saved.
    query = select(Asset).where(Asset.project_id == project_id, Asset.type == "image")
    assets = session.exec(query.order_by(col(Asset.created_at).desc())).all()
    return [GalleryImage(**asset.model_dump(), meta_json=json.dumps(settings_meta(asset))) for asset in assets]


def settings_meta(asset: Asset) -> dict[str, Any]:
    """The asset's meta, plus the settings under the names the front end reads back to repeat an image (its
    gallery: width, height, steps, guidance, reference_elements) and under the request's (num_inference_steps,
    guidance_scale)."""
    meta = dict(asset.meta)
    meta.setdefault("width", asset.width)
    meta.setdefault("height", asset.height)
    meta.setdefault("num_inference_steps", meta.get("steps"))
    meta.setdefault("guidance_scale", meta.get("guidance"))
    meta.setdefault("reference_elements", meta.get("reference_images", []))  # sent back as reference_images
    return meta


@router.get("/uploads", summary="The asset library: every upload and generated file, newest first")
def library(session: SessionDep) -> list[LibraryItem]:
    assets = session.exec(select(Asset).order_by(col(Asset.created_at).desc())).all()
    return [LibraryItem(id=a.id, asset_id=a.id, url=a.url, path=a.url, access_path=a.url, type=a.type,
                        filename=a.filename, thumbnail=a.thumbnail_url, width=a.width, height=a.height,
                        project_id=a.project_id, created_at=a.created_at) for a in assets]  # fmt: skip


@router.delete("/assets/{asset_id}", summary="Delete an asset and its files")
def delete_asset(asset_id: str, media: MediaDep, session: SessionDep) -> AssetDeleted:
    asset = session.get(Asset, asset_id)
    # The row goes first, by a statement that says whether it was still there: the front end sends every image
    # DELETE twice at once, and only the request that removed the row removes the files.
    if asset is None or session.execute(delete(Asset).where(col(Asset.id) == asset_id)).rowcount == 0:
        raise HTTPException(404, f"asset_id {asset_id!r}: no such asset")
    session.commit()
    for url in (asset.path, asset.thumbnail_url):
        if url:
            media.delete(url)
    return AssetDeleted(status="deleted", asset_id=asset_id)


@router.post("/upload", summary="Upload an image (a reference, an element picture, a mask)")
async def upload(
    media: MediaDep,
    session: SessionDep,
    file: Annotated[UploadFile, File()],
    project_id: Annotated[str | None, Form()] = None,
    type: Annotated[str, Form()] = "general",
) -> Uploaded:
    if project_id is not None and session.get(Project, project_id) is None:
        raise HTTPException(404, f"project_id {project_id!r}: no such project")
    data = await file.read(media.max_upload_bytes + 1)  # a byte over the limit is enough to refuse
    try:  # decoding a large image takes a while: not on the event loop
        path, (width, height) = await run_in_threadpool(_store_upload, media, data, file.filename, project_id, type)
    except ValueError as err:
        raise HTTPException(413 if len(data) > media.max_upload_bytes else 422, str(err)) from None
    url = media.url_for(path)
    asset = Asset(project_id=project_id, type="image", path=media.relative_path(path), url=url,
                  filename=path.name, width=width, height=height, meta={"source": "upload", "kind": type})  # fmt: skip
    session.add(asset)
    session.commit()
    # `type` answers the media type (the front end's library reads it); the form's `type` is the upload's kind.
    return Uploaded(url=url, asset_id=asset.id, type=asset.type, filename=path.name, access_path=url)


def _store_upload(media, data: bytes, filename: str | None, project_id: str | None, kind: str):
    path = media.save_upload(data, filename or "upload", project_id, kind)
    with Image.open(path) as image:
        return path, image.size


@media_router.get("/projects/{path:path}", summary="A project's media file (Range ok)", response_class=FileResponse,
                  responses=MEDIA_FILE)  # fmt: skip
def project_media(path: str, media: MediaDep) -> FileResponse:
    return _media(media, f"/projects/{quote(path)}")


@media_router.get("/uploads/{path:path}", summary="An upload without a project (Range ok)", response_class=FileResponse,
                  responses=MEDIA_FILE)  # fmt: skip
def upload_media(path: str, media: MediaDep) -> FileResponse:
    return _media(media, f"/uploads/{quote(path)}")


@media_router.get("/generated/{name}", summary="A job output by the app's older URL: /generated/{job_id}.jpg",
                  response_class=FileResponse, responses=MEDIA_FILE)  # fmt: skip
def legacy_generated_media(name: str, media: MediaDep) -> FileResponse:
    if (file := media.find_generated(name)) is None:
        raise HTTPException(404, f"/generated/{name}: no job output of that name")
    return FileResponse(file)


def _media(media, url: str) -> FileResponse:
    """`url` quoted again: the route's path is already decoded, and resolve() decodes a URL once."""
    try:
        file = media.resolve(url, "path")
    except ValueError as err:
        raise HTTPException(400, str(err)) from None
    if not file.is_file():
        raise HTTPException(404, f"{url}: no such file")
    return FileResponse(file)
