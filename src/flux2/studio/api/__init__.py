"""The studio's HTTP routes, one module per resource: jobs, assets (and media), projects (and elements), edit
(inpainting and segmentation), events (SSE). `deps` names what routes receive; `schemas` what they accept."""
