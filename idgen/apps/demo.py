"""The Gradio demo: ``idgen demo`` serves it on http://127.0.0.1:7860.

Models load once at start; each click only generates. Bad input (no face, a corrupt or too
large upload) shows a readable message in the page, and the app keeps working.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import uuid
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from idgen.adapters.regions import columns
from idgen.errors import IDGenError
from idgen.faces import KPS_COLORS, FaceAnalyzer, load_image

from .facefix import fix_faces, people_identities
from .guard import finite_call
from .session import Session, SessionOptions, start_session

#: Prompt templates: "{prompt}" is the user's text.
STYLES = {
    "none": "{prompt}",
    "photograph": "{prompt}, professional photograph, 85mm, sharp focus, natural light",
    "cinematic": "{prompt}, cinematic still, dramatic lighting, film grain, shallow depth of field",
    "watercolor": "{prompt}, watercolor painting, soft washes, paper texture",
    "comic": "{prompt}, comic book illustration, bold ink lines, flat colors",
}
NEGATIVE = "lowres, bad anatomy, worst quality, low quality, blurry, monochrome"


def face_preview(analyzer: FaceAnalyzer, image: Any, selected: int = 0) -> Image.Image:
    """The uploaded photo with each detected face's box, number (0 = largest) and 5 keypoints
    drawn on it; the ``selected`` face in green."""
    photo = load_image(image, analyzer.max_pixels)
    faces = analyzer.analyze(photo)
    if not faces:
        raise IDGenError(
            f"no face found in the photo: use a clear, frontal face at least {analyzer.detector.min_face_size} pixels wide"
        )
    draw = ImageDraw.Draw(photo)
    width = max(2, photo.width // 200)
    for rank, face in enumerate(faces):
        colour = (0, 255, 0) if rank == selected else (255, 160, 0)
        draw.rectangle([float(v) for v in face.bbox], outline=colour, width=width)
        draw.text((float(face.bbox[0]) + width, float(face.bbox[1]) + width), str(rank), fill=colour,
                  font_size=max(12, int(face.bbox[3] - face.bbox[1]) // 6))
        for (x, y), colour in zip(face.kps, KPS_COLORS):
            r = width * 2
            draw.ellipse([x - r, y - r, x + r, y + r], fill=colour)
    return photo


class DemoApp:
    """What a click runs, separate from the UI so it can be called directly."""

    #: Result files kept in the demo's own folder: the oldest go first (a server runs for days).
    keep = 200

    def __init__(self, session: Session, pipe, out_dir: str | None = None):
        self.session, self.pipe, self.analyzer = session, pipe, session.analyzer
        self.has_identitynet = getattr(pipe, "has_identitynet", False)
        method = session.method
        self.adapter_attention = method.uses_prompt and not method.prompt_identity  # id_scale applies
        # Results are PNG files with the same metadata as the CLI's (the gallery would re-encode images),
        # in a folder of the demo's own (removed when it exits) unless one is given.
        self.out_dir = out_dir or tempfile.mkdtemp(prefix="idgen-demo-")
        if out_dir is None:
            atexit.register(shutil.rmtree, self.out_dir, True)

    def preview(self, files, face_index: float = 0) -> Image.Image | None:
        import gradio as gr  # lazy: optional dependency (idgen[demo])

        if not files:
            return None
        try:
            return face_preview(self.analyzer, _path(files[0]), int(face_index or 0))
        except IDGenError as err:
            raise gr.Error(str(err)) from None

    def generate(self, files, pose, prompt, negative_prompt, style, id_scale, identitynet_scale, steps, guidance,
                 seed, num_images, face_index: float = 0, fix: bool = False, people: bool = False
                 ) -> list[tuple[str, str]]:
        """Generate, write each image as PNG with its metadata, and return (path, caption) pairs.
        With ``people`` each photo is a different person: around the faces of the pose photo, else
        in equal columns left to right."""
        import gradio as gr  # lazy: optional dependency (idgen[demo])

        try:
            if not files:
                raise IDGenError("upload at least one face photo first")
            if self.session.method.uses_prompt and not (prompt or "").strip():
                raise IDGenError("write a prompt first")
            if (people or fix) and not self.adapter_attention:
                raise IDGenError("several people and Fix faces need FaceID or InstantID (adapter attention)")
            if pose is not None and not (people or self.has_identitynet):
                raise IDGenError("the pose photo poses InstantID's IdentityNet, which this model does not have; it "
                                 "also places several people: tick Several people, or remove it")
            photos, seed, face_index = [_path(f) for f in files], int(seed), int(face_index or 0)
            id_embeds = self.session.people(photos, face_index) if people else self.session.identity(photos, face_index)
            text = STYLES.get(style, "{prompt}").format(prompt=(prompt or "").strip())
            identity = dict(self.session.clip_inputs(self.pipe, photos, face_index, people), id_embeds=id_embeds)
            call = dict(self.session.call_kwargs(text), **identity,
                        num_inference_steps=int(steps), guidance_scale=float(guidance),
                        num_images_per_prompt=int(num_images), generator=self.session.generators(seed, int(num_images)))
            settings = dict(steps=int(steps), guidance=float(guidance), face_index=face_index, style=style,
                            faces=", ".join(os.path.basename(p) if isinstance(p, str) else "uploaded image" for p in photos))
            if self.session.method.uses_prompt:
                call.update(negative_prompt=negative_prompt or None)
                settings.update(prompt=text, negative_prompt=negative_prompt or None)
            if self.adapter_attention:
                call.update(id_scale=float(id_scale))
                settings.update(id_scale=float(id_scale))
            if self.session.method.prompt_identity:  # PhotoMaker: its merge step follows the steps slider
                call.update(start_merge_step=self.session.merge_step(int(steps)))
                settings.update(start_merge_step=call["start_merge_step"])
            if people:
                options = self.session.options
                regions = "faces" if pose is not None else columns(len(photos), *self.pipe.output_size(
                    None, options.height, options.width))
                call.update(regions=regions, face_index=face_index,
                            kps_image=_path(pose) if pose is not None else photos if self.has_identitynet else None)
                settings.update(people=len(photos), regions="faces of the pose photo" if pose is not None else "columns")
            if self.has_identitynet:
                if not people:
                    call.update(kps_image=_path(pose) if pose is not None else photos[0],
                                face_index=face_index if pose is None else 0)
                call.update(controlnet_conditioning_scale=float(identitynet_scale))
                settings.update(identitynet_scale=float(identitynet_scale),
                                kps_image="pose photo" if pose is not None else "face photo")
            warning = self.session.prompt_warning(self.pipe, text if self.session.method.uses_prompt else None)
            if warning:
                gr.Warning(warning)
            images = finite_call(self.pipe, **call).images
            fix_identity: dict[str, Any] | list[dict[str, Any]] = identity
            fix_regions = None
            if fix and people:  # each face takes the identity of the region it lies in
                fix_identity, fix_regions = people_identities(self.pipe, identity, call["regions"], len(photos),
                                                              _path(pose) if pose is not None else None)
            fixed = [fix_faces(self.session, self.pipe, image, fix_identity, text, seed + i,
                               negative_prompt=negative_prompt or None, keep_faceless=True, regions=fix_regions)
                     if fix else (image, {}) for i, image in enumerate(images)]
        except IDGenError as err:
            message = str(err)
            for photo in [_path(f) for f in files or []] + ([_path(pose)] if pose is not None else []):
                if isinstance(photo, str):  # uploads live in a temporary folder: name the file only
                    message = message.replace(photo, os.path.basename(photo))
            raise gr.Error(message) from None
        results = []
        self._prune(len(fixed))
        for i, (image, fix_settings) in enumerate(fixed):
            path = os.path.join(self.out_dir, f"{uuid.uuid4().hex[:12]}-seed{seed + i}.png")
            self.session.save(image, path, self.pipe, seed + i, **settings, **fix_settings)
            scale = f" · id_scale {float(id_scale):.2f}" if self.adapter_attention else ""
            results.append((path, f"seed {seed + i}{scale} · {text}"))
        return results


    def _prune(self, coming: int) -> None:
        """Remove the oldest results so that ``coming`` new ones leave at most ``keep``."""
        files = sorted((entry for entry in os.scandir(self.out_dir) if entry.name.endswith(".png")),
                       key=lambda entry: entry.stat().st_mtime)
        for entry in files[:max(0, len(files) + coming - self.keep)]:
            os.remove(entry.path)


def _path(item: Any) -> Any:
    """A Gradio upload (path string, file object or numpy image) as something load_image reads."""
    if isinstance(item, (str, np.ndarray, Image.Image)):
        return item
    return getattr(item, "name", None) or getattr(item, "path", None) or item


def build_demo(app: DemoApp):
    """The Gradio Blocks UI around ``app``."""
    import gradio as gr  # lazy: optional dependency (idgen[demo])

    with gr.Blocks(title="idgen") as demo:
        gr.Markdown("# idgen: identity-preserving generation\nUpload one or more photos of a face, describe the "
                    "scene, generate. " + _model_note(app))
        with gr.Row():
            with gr.Column():
                files = gr.File(label="Face photos", file_count="multiple", file_types=["image"], elem_id="faces")
                # The prompt and the button first, where the eye lands (as the reference demos); settings below.
                person = f"a person {app.session.options.trigger_word}" if app.session.method.prompt_identity else "a person"
                prompt = gr.Textbox(label="Prompt", value=f"a photo of {person}", elem_id="prompt",
                                    info="PhotoMaker: the class word, then the trigger word" if app.session.method.prompt_identity
                                    else None)
                run = gr.Button("Generate", variant="primary", elem_id="generate")
                detected = gr.Image(label="Detected faces (green: the one used)", interactive=False, elem_id="detected",
                                    height=240)
                start_index = app.session.options.face_index
                face_index = gr.Number(value=start_index if isinstance(start_index, int) else start_index[0],
                                       precision=0, minimum=0,
                                       label="Face number (0 = largest; as on the preview)", elem_id="face_index")
                people = gr.Checkbox(value=False, label="Several people: each photo is another person (placed around "
                                     "the faces of the pose photo, else side by side)", elem_id="people",
                                     visible=app.adapter_attention)
                pose = gr.Image(label="Pose photo (optional): InstantID's pose; with several people, a photo with a "
                                "face per person", type="filepath", visible=app.adapter_attention,
                                elem_id="pose")
                negative = gr.Textbox(label="Negative prompt", value=NEGATIVE)
                style = gr.Dropdown(list(STYLES), value="none", label="Style")
                default_scale = app.session.id_scale
                id_scale = gr.Slider(0.0, 1.5, value=default_scale if isinstance(default_scale, float) else 1.0, step=0.05,
                                     label="Identity strength (id_scale)", visible=app.adapter_attention)
                identitynet = gr.Slider(0.0, 1.5, value=0.8, step=0.05, label="IdentityNet strength",
                                        visible=app.has_identitynet)
                fixed = bool(app.session.options.timesteps)  # --timesteps sets the steps
                steps = gr.Slider(1, 100, value=app.session.steps, step=1, label="Steps", interactive=not fixed,
                                  info="set by --timesteps" if fixed else None)
                guidance = gr.Slider(0.0, 15.0, value=app.session.guidance, step=0.5, label="Guidance")
                seed = gr.Number(value=0, precision=0, label="Seed")
                count = gr.Slider(1, 4, value=1, step=1, label="Images")
                fix = gr.Checkbox(value=False, label="Fix faces (repaint each face found with the identity)",
                                  visible=app.adapter_attention, elem_id="fix_faces")
            with gr.Column():
                gallery = gr.Gallery(label="Results (PNG with settings as metadata)", elem_id="gallery", columns=2,
                                     height=520, format="png")
        files.change(app.preview, inputs=[files, face_index], outputs=detected)
        face_index.change(app.preview, inputs=[files, face_index], outputs=detected)

        def generate(*values, progress=gr.Progress(track_tqdm=True)):  # noqa: B008  # gradio reads the bar from this default
            return app.generate(*values)

        run.click(generate, inputs=[files, pose, prompt, negative, style, id_scale, identitynet, steps, guidance, seed,
                                    count, face_index, fix, people], outputs=gallery)
    return demo


def _model_note(app: DemoApp) -> str:
    meta = app.session.metadata()
    note = f"Base: `{meta['base_model']}`, method: {meta['method']}."
    if "random_weights" in meta:
        note += " **Offline tiny preset: random weights, the images are noise** (pass --base/--adapter for real models)."
    return note


def serve(options: SessionOptions, host: str = "127.0.0.1", port: int = 7860) -> None:
    """Load the models once, then serve the UI."""
    try:
        import gradio  # noqa: F401  # lazy: optional dependency (idgen[demo])
    except ImportError:
        raise IDGenError('the demo needs gradio: pip install "idgen[demo]"') from None
    session = start_session(options)
    app = DemoApp(session, session.load())
    demo = build_demo(app)
    print(f"idgen demo on http://{host}:{port}", flush=True)
    demo.queue().launch(server_name=host, server_port=port, share=False, show_error=True)
