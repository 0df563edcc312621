"""Projects, their storyboard (scenes and shots, saved whole with the project) and their elements (characters,
locations, objects with a trigger word and a picture)."""

from fastapi import APIRouter, HTTPException
from sqlalchemy import delete
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from flux2.studio.api.deps import JobsDep, MediaDep, ModelDep, SessionDep, WorkerDep
from flux2.studio.api.jobs import IdempotencyKey, Submission, earlier_job, fitted, queue_job, require_project
from flux2.studio.api.responses import ElementDeleted, ProjectDeleted, ProjectDetail, ProjectOut, Queued, ShotOut
from flux2.studio.api.schemas import (
    ElementCreate,
    ElementUpdate,
    ProjectCreate,
    ProjectSave,
    ProjectUpdate,
    SceneSave,
    ShotSave,
    VisualizeRequest,
    trigger_from_name,
)
from flux2.studio.payloads import VisualizeJob
from flux2.studio.records import Element, Project, Scene, Shot, utcnow
from flux2.studio.storage import check_safe_id

router = APIRouter(tags=["projects"])
NEW_PROJECT_NAME = "Untitled Project"  # the name of the front end's built-in project, saved before it is named
VISUAL_TEMPLATES = {
    "character": "character sheet of {name}, {description}; full body, front and side views, neutral background",
    "location": "concept art of {name}, {description}; wide establishing shot, natural light",
    "object": "product shot of {name}, {description}; clean background, soft studio light",
}


@router.post("/projects", status_code=201, summary="Create a project")
def create_project(body: ProjectCreate, session: SessionDep) -> ProjectOut:
    project = Project(**body.model_dump())
    session.add(project)
    session.commit()
    return ProjectOut.model_validate(project)


@router.get("/projects", summary="All projects, newest first")
def list_projects(session: SessionDep) -> list[ProjectOut]:
    projects = session.exec(select(Project).order_by(col(Project.created_at).desc())).all()
    return [ProjectOut.model_validate(project) for project in projects]


@router.get("/projects/{project_id}", summary="One project, with its scenes and shots")
def get_project(project_id: str, session: SessionDep) -> ProjectDetail:
    return project_detail(session, require_project(session, project_id))


@router.patch("/projects/{project_id}", summary="Change a project's fields")
def update_project(project_id: str, body: ProjectUpdate, session: SessionDep) -> ProjectOut:
    project = require_project(session, project_id)
    _set_fields(project, body.model_dump(exclude_unset=True, exclude_none=True))
    session.add(project)
    session.commit()
    return ProjectOut.model_validate(project)


@router.put("/projects/{project_id}", summary="Save a project whole: its fields, scenes and shots (or create it)")
def save_project(project_id: str, body: ProjectSave, session: SessionDep) -> ProjectDetail:
    """Creates the project with this id if there is none. `scenes` and `shots`, when sent, replace the
    project's, in the same transaction as its fields: a save that is refused stores nothing."""
    try:  # the id names the project's media folder
        check_safe_id("project_id", project_id)
    except ValueError as err:
        raise HTTPException(422, str(err)) from None
    _check_ids(body)
    try:
        project = _save(session, project_id, body)
    except IntegrityError:  # another save created the project (or a shot) meanwhile: save over it once
        session.rollback()
        project = _save(session, project_id, body)
    return project_detail(session, project)


def _save(session: Session, project_id: str, body: ProjectSave) -> Project:
    project = session.get(Project, project_id)
    if project is None:
        project = Project(id=project_id, **{"name": NEW_PROJECT_NAME, **body.fields()})
    else:
        _set_fields(project, body.fields())
    session.add(project)
    session.flush()  # the project's row first: scenes and shots refer to it
    _replace_storyboard(session, project, body)
    session.commit()
    return project


def _set_fields(project: Project, fields: dict) -> None:
    for field, value in fields.items():
        setattr(project, field, value)
    project.updated_at = utcnow()


def _check_ids(body: ProjectSave) -> None:
    """Scene and shot ids are the client's: safe id strings, each once. A 422 names the item."""
    for kind, items in (("scenes", body.scenes), ("shots", body.shots)):
        seen: set[str] = set()
        for i, item in enumerate(items or []):
            try:
                check_safe_id(f"{kind}[{i}].id", item.id)
            except ValueError as err:
                raise HTTPException(422, str(err)) from None
            if item.id in seen:
                raise HTTPException(422, f"{kind}[{i}].id {item.id!r} is given twice")
            seen.add(item.id)


def _replace_storyboard(session: Session, project: Project, body: ProjectSave) -> None:
    """The saved scenes and shots replace the project's; a list left out keeps the stored one. Every shot's
    scene must be one of the project's scenes after the save (422, naming the shot, otherwise)."""
    stored = {scene.id for scene in session.exec(select(Scene).where(Scene.project_id == project.id))}
    scene_ids = {scene.id for scene in body.scenes} if body.scenes is not None else stored
    if body.shots is not None:
        for i, shot in enumerate(body.shots):
            if shot.scene_id is not None and shot.scene_id not in scene_ids:
                raise HTTPException(422, f"shots[{i}].scene_id {shot.scene_id!r}: no such scene in this project")
    else:
        kept = session.exec(select(Shot).where(Shot.project_id == project.id, col(Shot.scene_id).is_not(None)))
        for shot in kept:
            if shot.scene_id not in scene_ids:
                raise HTTPException(422, f"scenes: the stored shot {shot.id!r} is in scene {shot.scene_id!r}, "
                                         "which this save leaves out: send the shots too")  # fmt: skip
    if body.shots is not None:
        ids = [shot.id for shot in body.shots]
        session.execute(delete(Shot).where(col(Shot.project_id) == project.id, col(Shot.id).not_in(ids)))
    if body.scenes is not None:
        ids = [scene.id for scene in body.scenes]
        session.execute(delete(Scene).where(col(Scene.project_id) == project.id, col(Scene.id).not_in(ids)))
        for i, scene in enumerate(body.scenes):
            index = i if scene.index is None else scene.index
            session.merge(Scene(project_id=project.id, id=scene.id, index=index, name=scene.name,
                                script_content=scene.script_content))  # fmt: skip
        session.flush()  # scenes before the shots that refer to them
    for i, shot in enumerate(body.shots or []):
        session.merge(_shot_record(project, i, shot))


def _shot_record(project: Project, position: int, shot: ShotSave) -> Shot:
    """A saved shot as a row: its known fields in columns, the rest in `extra`. Size and fps left out are the
    project's (the front end's save leaves out a shot's height)."""
    known = {name: getattr(shot, name) for name in ShotSave.model_fields if name != "id"}
    extra = {name: value for name, value in (shot.model_extra or {}).items() if name != "project_id"}
    defaults = {"width": project.resolution_w, "height": project.resolution_h, "fps": project.fps}
    known |= {name: value for name, value in defaults.items() if known[name] is None}
    known["prompt"] = known["prompt"] or ""
    known["timeline"] = known["timeline"] or []
    return Shot(project_id=project.id, id=shot.id, position=position, extra=extra, **known)


def project_detail(session: Session, project: Project) -> ProjectDetail:
    """The project as GET /projects/{id} answers it: its fields, scenes and shots."""
    scenes = session.exec(select(Scene).where(Scene.project_id == project.id)
                          .order_by(col(Scene.index), col(Scene.id))).all()  # fmt: skip
    shots = session.exec(select(Shot).where(Shot.project_id == project.id).order_by(col(Shot.position))).all()
    return ProjectDetail(
        **{name: getattr(project, name) for name in ProjectOut.model_fields},
        scenes=[SceneSave(id=scene.id, index=scene.index, name=scene.name, script_content=scene.script_content)
                for scene in scenes],
        shots=[shot_out(shot) for shot in shots],
    )  # fmt: skip


def shot_out(shot: Shot) -> ShotOut:
    columns = shot.model_dump(exclude={"extra", "position"})
    return ShotOut(**{**shot.extra, **columns})


@router.delete("/projects/{project_id}", summary="Delete a project, its elements, assets and files")
def delete_project(project_id: str, jobs: JobsDep, media: MediaDep, session: SessionDep) -> ProjectDeleted:
    project = require_project(session, project_id)
    if jobs.active(project_id):
        raise HTTPException(409, f"project {project_id} has queued or running jobs: cancel them first")
    session.delete(project)
    session.commit()
    media.remove_project(project_id)
    return ProjectDeleted(status="deleted", project_id=project_id)


@router.post("/projects/{project_id}/elements", status_code=201, summary="Create an element")
def create_element(project_id: str, body: ElementCreate, media: MediaDep, session: SessionDep) -> Element:
    """A `trigger_word` left empty is made from the name ("Old Tom" -> "@OldTom"); 409 if the project has it."""
    require_project(session, project_id)
    _check_trigger(session, project_id, body.trigger_word)
    fields = body.model_dump()
    if body.image_path:  # stored as a media URL, whatever form the client gave
        fields["image_path"] = _picture(media, body.image_path)
    element = Element(project_id=project_id, **fields)
    session.add(element)
    session.commit()
    return element


@router.get("/projects/{project_id}/elements", summary="A project's elements (none for an unknown project)")
def list_elements(project_id: str, session: SessionDep) -> list[Element]:
    # [] rather than 404: the front end lists the elements of its built-in project before it is first saved.
    return list(session.exec(select(Element).where(Element.project_id == project_id)).all())


@router.patch("/elements/{element_id}", summary="Change an element's fields")
@router.put("/elements/{element_id}", summary="Change an element's fields (the front end's form)")
def update_element(element_id: str, body: ElementUpdate, media: MediaDep, session: SessionDep) -> Element:
    """The fields given change; a `trigger_word` of "" is made from the (new) name, as on creation."""
    element = _element(session, element_id)
    changes = body.model_dump(exclude_unset=True, exclude_none=True)
    if changes.get("trigger_word", "x").strip() == "":
        try:
            changes["trigger_word"] = trigger_from_name(changes.get("name", element.name))
        except ValueError as err:
            raise HTTPException(422, str(err)) from None
    if "trigger_word" in changes:
        _check_trigger(session, element.project_id, changes["trigger_word"], element.id)
    if changes.get("image_path"):  # stored as a media URL, whatever form the client gave
        changes["image_path"] = _picture(media, changes["image_path"])
    elif changes.get("image_path") == "":
        changes["image_path"] = None  # the picture is cleared
    for field, value in changes.items():
        setattr(element, field, value)
    session.add(element)
    session.commit()
    return element


@router.delete("/elements/{element_id}", summary="Delete an element")
def delete_element(element_id: str, session: SessionDep) -> ElementDeleted:
    session.delete(_element(session, element_id))
    session.commit()
    return ElementDeleted(status="deleted", element_id=element_id)


@router.post("/elements/{element_id}/visualize", summary="Queue a picture of the element (it becomes its image)")
def visualize(element_id: str, body: VisualizeRequest, jobs: JobsDep, worker: WorkerDep, model: ModelDep,
              media: MediaDep, session: SessionDep, idempotency_key: IdempotencyKey = None) -> Queued:  # fmt: skip
    submission = Submission.of(idempotency_key, f"/elements/{element_id}/visualize", body)
    if (earlier := earlier_job(session, submission)) is not None:
        return Queued(job_id=earlier.id, status="queued")
    element = _element(session, element_id)
    request, notes = fitted(body, body.to_request(body.prompt_override or visual_prompt(element)), model, media)
    payload = VisualizeJob(project_id=element.project_id, element_id=element.id, request=request, notes=notes)
    return queue_job(jobs, worker, payload, submission=submission, session=session)


def visual_prompt(element: Element) -> str:
    """A picture of the element in words, after its type: a character sheet, concept art, a product shot."""
    return VISUAL_TEMPLATES[element.type].format(name=element.name, description=element.description or element.name)


def _picture(media, image_path: str) -> str:
    path = media.resolve(image_path, "image_path")
    if not path.is_file():
        raise HTTPException(422, f"image_path {image_path!r}: no such file (upload it first)")
    return media.url_for(path)


def _element(session, element_id: str) -> Element:
    element = session.get(Element, element_id)
    if element is None:
        raise HTTPException(404, f"element_id {element_id!r}: no such element")
    return element


def _check_trigger(session, project_id: str, trigger: str, own_id: str | None = None) -> None:
    """Trigger words are resolved within their project, so they must be unique there (and only there)."""
    taken = session.exec(select(Element).where(Element.project_id == project_id, Element.trigger_word == trigger))
    if any(element.id != own_id for element in taken):
        raise HTTPException(409, f"trigger_word {trigger!r} is already used by another element of this project")
