"""Projects and their elements (characters, locations, objects with a trigger word and a picture)."""

from fastapi import APIRouter, HTTPException
from sqlalchemy.exc import IntegrityError
from sqlmodel import col, select

from flux2.studio.api.deps import JobsDep, MediaDep, ModelDep, SessionDep, WorkerDep
from flux2.studio.api.jobs import IdempotencyKey, Submission, earlier_job, fitted, queue_job, require_project
from flux2.studio.api.responses import ElementDeleted, ProjectDeleted, ProjectOut, Queued
from flux2.studio.api.schemas import (
    ElementCreate,
    ElementUpdate,
    ProjectCreate,
    ProjectSave,
    ProjectUpdate,
    VisualizeRequest,
    trigger_from_name,
)
from flux2.studio.payloads import VisualizeJob
from flux2.studio.records import Element, Project, utcnow
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


@router.get("/projects/{project_id}", summary="One project")
def get_project(project_id: str, session: SessionDep) -> ProjectOut:
    return ProjectOut.model_validate(require_project(session, project_id))


@router.patch("/projects/{project_id}", summary="Change a project's fields")
def update_project(project_id: str, body: ProjectUpdate, session: SessionDep) -> ProjectOut:
    project = require_project(session, project_id)
    return ProjectOut.model_validate(_change(session, project, body.model_dump(exclude_unset=True, exclude_none=True)))


@router.put("/projects/{project_id}", summary="Save a project: create it with this id, or change its fields")
def save_project(project_id: str, body: ProjectSave, session: SessionDep) -> ProjectOut:
    try:  # the id names the project's media folder
        check_safe_id("project_id", project_id)
    except ValueError as err:
        raise HTTPException(422, str(err)) from None
    project = session.get(Project, project_id)
    if project is None:
        project = Project(id=project_id, **{"name": NEW_PROJECT_NAME, **body.fields()})
        session.add(project)
        try:
            session.commit()
            return ProjectOut.model_validate(project)
        except IntegrityError:  # another save created it meanwhile: change that one
            session.rollback()
            project = require_project(session, project_id)
    return ProjectOut.model_validate(_change(session, project, body.fields()))


def _change(session, project: Project, fields: dict) -> Project:
    for field, value in fields.items():
        setattr(project, field, value)
    project.updated_at = utcnow()
    session.add(project)
    session.commit()
    return project


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
              session: SessionDep, idempotency_key: IdempotencyKey = None) -> Queued:  # fmt: skip
    submission = Submission.of(idempotency_key, f"/elements/{element_id}/visualize", body)
    if (earlier := earlier_job(session, submission)) is not None:
        return Queued(job_id=earlier.id, status="queued")
    element = _element(session, element_id)
    request, notes = fitted(body, body.to_request(body.prompt_override or visual_prompt(element)), model)
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
