"""The LoRA files the service offers: `.safetensors` files its operator put in the data folder's `loras/`. A job
names them in `loras: [{name, strength}]`; nothing here uploads or changes them."""

from datetime import UTC, datetime

from fastapi import APIRouter

from flux2.studio.api.deps import MediaDep
from flux2.studio.api.responses import LoraOnOffer

router = APIRouter(tags=["loras"])


@router.get("/loras", summary="The LoRA files jobs can name, by file name")
def list_loras(media: MediaDep) -> list[LoraOnOffer]:
    offered = []
    for path in media.lora_files():
        stat = path.stat()
        offered.append(LoraOnOffer(name=path.name, size_bytes=stat.st_size,
                                   modified=datetime.fromtimestamp(stat.st_mtime, UTC)))  # fmt: skip
    return offered
