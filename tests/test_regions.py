"""Several people in one image: each identity acts in its own region (SD1.5 FaceID, SDXL InstantID)."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from idgen import IdentityInputError, IDStableDiffusionImg2ImgPipeline, IDStableDiffusionXLPipeline, load_identitynet
from idgen.adapters.context import current, open_identity
from idgen.adapters.regions import Regions, place_kps
from idgen.testing.presets import INSTANTID_FILE, get_preset

from .conftest import embedding

W, H = 256, 128
HALVES = [(0, 0, W // 2, H), (W // 2, 0, W, H)]  # left person, right person (boxes in output pixels)


def latents(pipe, id_embeds, **kwargs):
    """The final latents (C, h, w): free of the VAE decoder's own spatial mixing."""
    kwargs.setdefault("height", H)
    kwargs.setdefault("width", W)
    return pipe("a photo of two people", id_embeds=id_embeds, num_inference_steps=3, output_type="latent",
                generator=torch.Generator().manual_seed(0), **kwargs).images[0]


def change_by_half(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    diff = (a - b).abs()
    half = diff.shape[-1] // 2
    return float(diff[..., :half].mean()), float(diff[..., half:].mean())


def assert_each_identity_acts_in_its_half(run, a, b, other_a, other_b, factor=1.5):
    """Perturbing person A changes the left half of the final latents more than ``factor`` times
    as much as the right, and perturbing B the reverse. (Not zero: the UNet's convolutions and
    self-attention carry each half's change across the image; measured 1.8x to 3.4x on the tiny
    random models. Each attention layer itself is exact: ``test_attention_is_masked_exactly``.)"""
    base = run(torch.stack([a, b]))
    left, right = change_by_half(run(torch.stack([other_a, b])), base)
    assert left > factor * right, (left, right)
    left, right = change_by_half(run(torch.stack([a, other_b])), base)
    assert right > factor * left, (left, right)


@pytest.mark.slow
def test_each_identity_acts_in_its_region(pipe):
    assert_each_identity_acts_in_its_half(lambda ids: latents(pipe, ids, regions=HALVES),
                                          embedding(0), embedding(1), embedding(2), embedding(3))
    # Control: one identity everywhere (no regions) moves both halves alike.
    left, right = change_by_half(latents(pipe, embedding(0)), latents(pipe, embedding(2)))
    assert 1 / 1.5 < left / right < 1.5, (left, right)


def test_attention_is_masked_exactly():
    """In one attention layer, the identity attention of a person is exactly zero outside their
    region (UNet branch), and IdentityNet's cross-attention there reads only the other person's
    tokens: positions outside A's region do not change when A's tokens do."""
    from diffusers.models.attention_processor import Attention

    from idgen.adapters import IdentityAdapter, IdentityAttention
    from idgen.adapters.attention import IdentityCall
    from idgen.adapters.regions import regional_cross_attention

    torch.manual_seed(0)
    attn = Attention(32, cross_attention_dim=16, heads=2, dim_head=16).eval()
    adapter = IdentityAdapter(torch.nn.Identity(), {"attn": IdentityAttention(32, 16, heads=2)})
    adapter.attach(torch.nn.ModuleDict({"attn": attn}))
    hidden, text = torch.randn(2, 8 * 16, 32), torch.randn(2, 7, 16)
    spec = Regions.from_spec([(0, 0, 64, 64), (64, 0, 128, 64)])  # left and right halves of an 8x16 latent
    weights = spec.weights(8, 16, 8, torch.device("cpu"))
    a, b, other_a = (torch.randn(2, 4, 16) for _ in range(3))
    outputs = []
    for tokens in (torch.cat([a, b], 1), torch.cat([other_a, b], 1)):
        call = IdentityCall(adapter)
        call.set_tokens(tokens, None, weights)
        with open_identity(call):
            outputs.append(attn(hidden, encoder_hidden_states=text).reshape(2, 8, 16, 32))
    assert torch.equal(outputs[0][:, :, 8:], outputs[1][:, :, 8:]) and not torch.equal(outputs[0], outputs[1])
    adapter.detach()
    owner = torch.nn.Module()  # the model whose calls open the weights (IdentityNet)
    regional_cross_attention(torch.nn.ModuleDict({"attn2": attn}), owner)
    weights = {"now": spec.weights(8, 16, 8, torch.device("cpu"), True)}
    with open_identity(SimpleNamespace(owner=owner, values={"region_weights": weights})):
        mixed = [attn(hidden, torch.cat([x, b], 1)).reshape(2, 8, 16, 32) for x in (a, other_a)]
    assert torch.equal(mixed[0][:, :, 8:], mixed[1][:, :, 8:]) and not torch.equal(mixed[0], mixed[1])
    only_b = attn(hidden, encoder_hidden_states=b).reshape(2, 8, 16, 32)  # outside the call: plain
    assert torch.allclose(mixed[0][:, :, 8:], only_b[:, :, 8:], atol=1e-6)  # B's own cross-attention there


@pytest.mark.slow
def test_full_frame_region_equals_unmasked_call(pipe):
    """One person whose mask covers the whole image: the same arithmetic as the plain call."""
    plain = latents(pipe, embedding(0))
    for region in (np.ones((H // 4, W // 4), np.float32), Image.new("L", (W, H), 255), (0, 0, W, H)):
        assert torch.equal(latents(pipe, embedding(0)[None], regions=[region]), plain)


def test_outside_every_region_no_identity_acts(pipe):
    """A region that covers only the left half: the right half sees (nearly) no identity, so two
    identities differ mostly on the left; with CFG and two images per prompt."""
    run = lambda emb: latents(pipe, emb[None], regions=[HALVES[0]], num_images_per_prompt=2)
    left, right = change_by_half(run(embedding(0)), run(embedding(1)))
    assert left > 2.0 * right, (left, right)


@pytest.mark.slow
def test_photos_people_and_batches(pipe, astronaut, group_photo):
    """face_image= holds one entry per person (a photo or a list of photos), the same people in
    every prompt; regions='faces' takes the people's parts from a group photo's faces."""
    images = pipe(["a photo", "a painting"], face_image=[astronaut, [astronaut, astronaut]], regions=HALVES,
                  height=H, width=W, num_inference_steps=2, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (2, H, W, 3)
    faces = pipe("a photo", face_image=[astronaut, astronaut], regions="faces", kps_image=group_photo,
                 num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0)).images
    width, height = pipe.output_size(Image.open(group_photo).size, None, None)
    assert faces.shape[1:3] == (height, width) and width > height  # the group photo's aspect


@pytest.mark.slow
def test_face_regions_from_group_photo(pipe, group_photo):
    """'faces': every pixel goes to the nearest chosen face; default the largest faces left to right,
    face_order picks faces counting left to right."""
    faces, size = pipe.pose_faces(group_photo, 2)
    assert faces[0].bbox[0] < faces[1].bbox[0]
    spec, chosen, _ = pipe.people_regions("faces", 2, group_photo)
    masks = spec.render(*size)
    assert np.array_equal(masks.sum(0), np.ones(size[::-1]))  # a partition of the image
    for mask, face in zip(masks, chosen):
        cx, cy = (face.bbox[:2] + face.bbox[2:]) / 2
        assert mask[int(cy), int(cx)] == 1.0
    everyone, _ = pipe.pose_faces(group_photo, 6, face_order=range(6))
    assert [f.bbox[0] for f in everyone] == sorted(f.bbox[0] for f in everyone)
    picked, _ = pipe.pose_faces(group_photo, 2, face_order=[5, 0])
    assert picked[0] is not None and picked[0].bbox[0] > picked[1].bbox[0]


def test_region_weights_at_every_resolution():
    spec = Regions.from_spec([(0, 0, 48, 64), (32, 0, 64, 64)])  # overlap in x 32..48
    levels = spec.weights(8, 8, 8, torch.device("cpu"))
    assert sorted(levels) == [1, 4, 16, 64]  # 8x8, 4x4, 2x2, 1x1
    full = levels[64].reshape(2, 8, 8)
    assert torch.equal(full[0, :, :4], torch.ones(8, 4)) and torch.equal(full[1, :, :4], torch.zeros(8, 4))
    assert torch.allclose(full[:, :, 4:6], torch.full((2, 8, 2), 0.5))  # shared where they overlap
    assert float(full.sum(0).max()) <= 1.0
    shared = spec.weights(8, 8, 8, torch.device("cpu"), normalise=True)
    assert all(torch.allclose(level.sum(0), torch.ones_like(level[0])) for level in shared.values())
    odd = Regions.from_spec([(0, 0, 40, 24)]).weights(3, 5, 8, torch.device("cpu"))
    assert sorted(odd) == [1, 2, 6, 15]  # 3x5 -> 2x3 -> 1x2 -> 1x1, as the UNet's downsamplers


def test_bad_regions_are_one_clear_error(pipe):
    two = torch.stack([embedding(0), embedding(1)])
    cases = [
        (dict(id_embeds=two, regions=[HALVES[0]]), "1 region(s) for 2 people"),
        (dict(id_embeds=two, regions=[(10, 10, 10, 20), HALVES[1]]), "is empty"),
        (dict(id_embeds=two, regions=[np.ones((64, 64)), HALVES[1]]), "aspect ratio"),
        (dict(id_embeds=two, regions=[np.full((H, W), 2.0), HALVES[1]]), "must lie in [0, 1]"),
        (dict(id_embeds=two, regions="left-right"), "regions='left-right'"),
        (dict(id_embeds=two, regions="faces"), "with kps_image="),
        (dict(id_embeds=embedding(0), kps_image="x.jpg"), "pass regions="),
        (dict(face_image="x.jpg", regions=HALVES), "one entry per person"),
        (dict(id_embeds=two, regions=[(W + 10, 0, W + 20, H), HALVES[1]]), "lies outside"),
    ]
    for kwargs, message in cases:
        with pytest.raises((IdentityInputError, ValueError), match=None) as err:
            latents(pipe, **kwargs) if "id_embeds" in kwargs else pipe("a photo", height=H, width=W, **kwargs)
        assert message in str(err.value), (message, str(err.value))


def test_img2img_with_regions(pipe, astronaut):
    """The img2img pipeline takes regions too (its size is the input image's)."""
    img2img = IDStableDiffusionImg2ImgPipeline.from_pipe(pipe)
    photo = Image.open(astronaut).convert("RGB").resize((W, H))
    run = lambda ids: img2img("a photo", image=photo, strength=0.9, id_embeds=ids, regions=HALVES,
                              num_inference_steps=4, output_type="latent",
                              generator=torch.Generator().manual_seed(0)).images[0]
    assert_each_identity_acts_in_its_half(run, embedding(0), embedding(1), embedding(2), embedding(3))


def test_place_kps_in_box():
    kps = np.array([[40.0, 50.0], [88.0, 50.0], [64.0, 75.0], [46.0, 98.0], [82.0, 98.0]])
    placed = place_kps(kps, (100, 0, 300, 400))
    assert np.ptp(placed, axis=0).max() == pytest.approx(0.3 * 200)
    assert placed.mean(0) == pytest.approx([200, 160])


# ---------------------------------------------------------------------------- SDXL InstantID
@pytest.fixture(scope="module")
def instantid(cache, analyzer):
    xl = get_preset("tiny-sdxl", root=str(cache))
    pipe = IDStableDiffusionXLPipeline.from_pretrained(xl.base, controlnet=load_identitynet(xl.adapter))
    pipe.load_identity_adapter(xl.adapter, weight_name=INSTANTID_FILE)
    pipe.set_face_analyzer(analyzer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.slow
def test_instantid_people_in_their_regions(instantid):
    """Both the identity attention and IdentityNet's take each person's tokens in their region."""
    kps = np.array([[40.0, 50.0], [88.0, 50.0], [64.0, 75.0], [46.0, 98.0], [82.0, 98.0]])
    face_kps = np.stack([kps * [0.5, 1], kps * [0.5, 1] + [W / 2, 0]])
    ids = [embedding(i, 20.0) for i in range(4)]
    assert_each_identity_acts_in_its_half(
        lambda e: latents(instantid, e, regions=HALVES, face_kps=face_kps), *ids)
    # IdentityNet alone (identity attention off): its tokens follow the regions too.
    assert_each_identity_acts_in_its_half(
        lambda e: latents(instantid, e, regions=HALVES, face_kps=face_kps, id_scale=0.0), *ids)


def test_instantid_full_frame_region_equals_unmasked_call(instantid):
    kps = np.array([[40.0, 50.0], [88.0, 50.0], [64.0, 75.0], [46.0, 98.0], [82.0, 98.0]])
    plain = latents(instantid, embedding(0, 20.0), face_kps=kps)
    one = latents(instantid, embedding(0, 20.0)[None], face_kps=kps[None], regions=[(0, 0, W, H)])
    assert torch.allclose(one, plain, atol=1e-5), float((one - plain).abs().max())
    assert current(instantid.controlnet) is None  # nothing of the call is left: IdentityNet runs plain


@pytest.mark.slow
def test_instantid_keypoints_of_every_person(instantid, astronaut, group_photo):
    """IdentityNet's image holds every person's keypoints: from the group photo's faces, or each
    person's face photo posed in their region."""
    drawn = []
    original = instantid.kps_condition
    instantid.kps_condition = lambda *args: drawn.append(original(*args)) or drawn[-1]
    try:
        latents(instantid, None, face_image=[astronaut, astronaut], regions=HALVES)
        latents(instantid, None, face_image=[astronaut, astronaut], regions="faces", kps_image=group_photo,
                height=None, width=None)
    finally:
        del instantid.kps_condition
    posed = np.asarray(drawn[0])
    red = np.all(posed == (255, 0, 0), axis=-1)  # the left-eye disc of each person
    assert red[:, : W // 2].any() and red[:, W // 2:].any()
    group = np.asarray(drawn[1])
    assert np.all(group == (255, 0, 0), axis=-1).any() and group.shape[1] > group.shape[0]


# ---------------------------------------------------------------------------- command line
@pytest.mark.slow
def test_cli_people(tmp_path, pipe, astronaut, group_photo, capsys):
    """--face-region places each --face's person; the image equals the Python call with the same
    regions. --people --kps-image takes the regions from a group photo (--face-order)."""
    from idgen.apps.cli import main

    out = tmp_path / "two.png"
    assert main(["generate", "--face", str(astronaut), "--face", str(astronaut), "--face-region", "0,0,128,128",
                 "--face-region", "128,0,256,128", "--width", "256", "--height", "128", "--prompt", "two people",
                 "--out", str(out), "--overwrite", "--steps", "2", "--no-watermark"]) == 0
    meta = Image.open(out).text
    assert meta["regions"] == "0,0,128,128; 128,0,256,128"
    ids = torch.from_numpy(np.stack([pipe.face_analyzer.identity([astronaut])] * 2))
    expected = pipe("two people", id_embeds=ids, regions=HALVES, height=H, width=W, num_inference_steps=2,
                    guidance_scale=7.5, generator=torch.Generator().manual_seed(0)).images[0]
    assert np.array_equal(np.asarray(Image.open(out).convert("RGB")), np.asarray(expected))

    group = tmp_path / "group.png"
    assert main(["generate", "--face", str(astronaut), "--face", str(astronaut), "--people", "--kps-image",
                 str(group_photo), "--face-order", "3,1", "--prompt", "two people", "--out", str(group),
                 "--steps", "2"]) == 0
    meta = Image.open(group).text
    assert meta["regions"] == "faces" and meta["face_order"] == "3,1"
    assert Image.open(group).width > Image.open(group).height  # the group photo's aspect

    for flags, message in (
        (["--face-region", "0,0,64,64", "--face-region", "64,0,128,64"], "2 --face-region for 1 --face"),
        (["--face-region", "0,0,64,64", "--face-region", "64,0,128,64", "--face", str(astronaut), "--face-order", "1,0"],
         "--face-order picks the faces of --kps-image"),
    ):
        assert main(["generate", "--face", str(astronaut), "--prompt", "p", "--out", str(out), "--overwrite", *flags]) == 2
        assert message in capsys.readouterr().err
    # --fix-faces with several people: each face by its region's identity (the tiny preset paints no face)
    assert main(["generate", "--face", str(astronaut), "--face", str(astronaut), "--people", "--fix-faces", "--prompt",
                 "p", "--steps", "1", "--out", str(out), "--overwrite"]) == 0
    assert Image.open(out).text["face_fix"] == "no face found"


@pytest.mark.slow
def test_cli_instantid_people(tmp_path, astronaut):
    """InstantID with --people and no pose photo: equal columns, each person's face posed in theirs."""
    from idgen.apps.cli import main

    out = tmp_path / "three.png"
    assert main(["generate", "--base", "tiny-sdxl", "--face", str(astronaut), "--face", str(astronaut), "--face",
                 str(astronaut), "--people", "--width", "192", "--prompt", "three people", "--out", str(out), "--overwrite",
                 "--steps", "2"]) == 0
    meta = Image.open(out).text
    assert meta["regions"] == "0,0,64,128; 64,0,128,128; 128,0,192,128" and meta["kps_image"] == "face photos"


@pytest.mark.slow
def test_faceid_sdxl_people(cache):
    """FaceID-SDXL (no IdentityNet) places each person in their region too."""
    from idgen.testing.presets import get_preset

    xl = get_preset("tiny-faceid-sdxl", root=str(cache))
    pipe = IDStableDiffusionXLPipeline.from_pretrained(xl.base)
    pipe.load_identity_adapter(xl.adapter)
    pipe.set_progress_bar_config(disable=True)
    assert torch.equal(latents(pipe, embedding(0)[None], regions=[(0, 0, W, H)]), latents(pipe, embedding(0)))
    assert_each_identity_acts_in_its_half(lambda e: latents(pipe, e, regions=HALVES), *(embedding(i) for i in range(4)))


@pytest.mark.slow
def test_negative_face_for_several_people(pipe, astronaut):
    """One negative identity serves every person: a negative photo equals its embedding given."""
    two = torch.stack([embedding(0), embedding(1)])
    from_photo = latents(pipe, two, regions=HALVES, negative_face_image=str(astronaut))
    given = latents(pipe, two, regions=HALVES, negative_id_embeds=torch.from_numpy(pipe.face_analyzer.identity([astronaut])))
    assert torch.equal(from_photo, given) and not torch.equal(from_photo, latents(pipe, two, regions=HALVES))
