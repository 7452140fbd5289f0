"""The Blender side of rendering: runs only inside a worker process (``worker.py``).

One :class:`Scene` per worker process. It sets up the renderer, world light and camera once;
then, per object, it clears the previous asset, imports the new one, normalises it and
renders every view of its rig. Coordinates are Blender's (z-up world, cameras look down
their -z axis with +y up, docs/design.md §4). glTF (y-up) and OBJ (-z forward, y up) importers
convert to z-up themselves: an OBJ vertex (x, y, z) lands at (x, -z, y).
"""

from __future__ import annotations

import math
import os
import time

import bpy
import numpy as np
from mathutils import Matrix

from mvdiff.shards import view_member

IMPORTERS = {
    ".glb": lambda p: bpy.ops.import_scene.gltf(filepath=p),
    ".gltf": lambda p: bpy.ops.import_scene.gltf(filepath=p),
    ".obj": lambda p: bpy.ops.wm.obj_import(filepath=p),
    ".fbx": lambda p: bpy.ops.import_scene.fbx(filepath=p),
    ".ply": lambda p: bpy.ops.wm.ply_import(filepath=p),
    ".stl": lambda p: bpy.ops.wm.stl_import(filepath=p),
}

# Object types that carry geometry we can normalise and render.
GEOMETRY_TYPES = {"MESH", "CURVE", "SURFACE", "META", "FONT", "CURVES", "POINTCLOUD"}


class AssetError(RuntimeError):
    """The asset cannot be rendered (bad file, nothing to render); not worth a retry."""


class Scene:
    def __init__(self, opts: dict):
        self.opts = opts
        bpy.ops.wm.read_factory_settings(use_empty=True)
        scene = bpy.context.scene
        render = scene.render
        render.engine = opts["engine"]
        render.resolution_x = render.resolution_y = int(opts["resolution"])
        render.resolution_percentage = 100
        render.film_transparent = True
        render.threads_mode = "FIXED"
        render.threads = max(1, int(opts.get("threads", 1)))
        # No persistent data: it saves nothing measurable at 256^2 and its Cycles session
        # keeps threads spinning (~0.5 core) whenever the worker is not rendering.
        render.use_persistent_data = False
        render.image_settings.file_format = "PNG"
        render.image_settings.color_mode = "RGBA"
        render.image_settings.color_depth = "8"
        scene.view_settings.view_transform = "Standard"
        scene.view_settings.look = "None"
        scene.view_settings.exposure = 0.0
        scene.view_settings.gamma = 1.0
        if opts["engine"] == "CYCLES":
            cy = scene.cycles
            cy.device = "CPU"
            cy.samples = int(opts["samples"])
            cy.use_denoising = bool(opts["denoise"])
            cy.denoiser = "OPENIMAGEDENOISE"
        tuned = opts["engine"] == "CYCLES" and opts.get("tuned", True)
        if tuned:  # tuned=False keeps Blender's stock Cycles settings (a benchmark baseline)
            cy.use_adaptive_sampling = True  # stop converged pixels (background, flat areas)
            cy.adaptive_threshold = float(opts["noise_threshold"])
            cy.adaptive_min_samples = int(opts.get("adaptive_min_samples", 0))
            # Albedo guided, fast prefilter: ~0.15 s at 256^2 instead of ~2 s for the
            # default three-pass "accurate" prefilter, with no visible loss on objects.
            cy.denoising_input_passes = opts.get("denoise_passes", "RGB_ALBEDO")
            cy.denoising_prefilter = opts.get("denoise_prefilter", "FAST")
            cy.denoising_quality = opts["denoise_quality"]
            # Under a uniform environment one indirect diffuse/glossy bounce is enough; glass
            # and alpha-blended materials keep max_bounces.
            bounces = int(opts["max_bounces"])
            cy.max_bounces = bounces
            cy.diffuse_bounces = cy.glossy_bounces = min(bounces, 1)
            cy.transmission_bounces = cy.transparent_max_bounces = bounces
            cy.caustics_reflective = cy.caustics_refractive = False

        # Even lighting: a uniform white environment (+ an optional sun from above-front).
        world = bpy.data.worlds.new("mvdiff_world")
        world.use_nodes = True
        background = world.node_tree.nodes["Background"]
        background.inputs["Color"].default_value = (1.0, 1.0, 1.0, 1.0)
        background.inputs["Strength"].default_value = float(opts["world_strength"])
        # A uniform world needs no importance map: BSDF sampling alone sees it without extra
        # noise (after denoising), and skipping world light sampling saves ~1/3 of each view.
        if tuned:
            world.cycles.sampling_method = "NONE"
        scene.world = world
        self.keep = set()
        if float(opts.get("sun_strength", 0.0)) > 0:
            sun = bpy.data.lights.new("mvdiff_sun", "SUN")
            sun.energy = float(opts["sun_strength"])
            sun_obj = bpy.data.objects.new("mvdiff_sun", sun)
            sun_obj.rotation_euler = (math.radians(40), 0.0, math.radians(30))
            scene.collection.objects.link(sun_obj)
            self.keep.add(sun_obj.name)

        self.passes = None
        if opts.get("depth") or opts.get("normal"):
            self.passes = self._setup_passes(
                scene, bool(opts.get("depth")), bool(opts.get("normal"))
            )

        cam_data = bpy.data.cameras.new("mvdiff_camera")
        cam_data.lens_unit = "FOV"
        cam_data.sensor_fit = "AUTO"  # square image: horizontal fov = vertical fov
        cam_data.clip_start = 0.01
        cam_data.clip_end = 1000.0
        self.camera = bpy.data.objects.new("mvdiff_camera", cam_data)
        scene.collection.objects.link(self.camera)
        scene.camera = self.camera
        self.keep.add(self.camera.name)
        self.scene = scene

    @staticmethod
    def _setup_passes(scene, depth: bool, normal: bool):
        """Compositor: planar depth and world-space normal passes -> float EXR per view."""
        layer = bpy.context.view_layer
        layer.use_pass_z = depth
        layer.use_pass_normal = normal
        tree = bpy.data.node_groups.new("mvdiff_passes", "CompositorNodeTree")
        scene.compositing_node_group = tree
        layers = tree.nodes.new("CompositorNodeRLayers")
        out = tree.nodes.new("CompositorNodeOutputFile")
        out.format.media_type = "IMAGE"
        out.format.file_format = "OPEN_EXR"
        out.format.color_depth = "32"
        if depth:
            out.file_output_items.new("FLOAT", "depth")
            tree.links.new(layers.outputs["Depth"], out.inputs["depth"])
        if normal:
            out.file_output_items.new("VECTOR", "normal")
            tree.links.new(layers.outputs["Normal"], out.inputs["normal"])
        return out

    @staticmethod
    def _read_exr(path: str) -> np.ndarray:
        """Float pixels [H, W, C] of an EXR, rows top-down (Blender stores bottom-up)."""
        img = bpy.data.images.load(path)
        w, h, c = img.size[0], img.size[1], img.channels
        px = np.empty(w * h * c, np.float32)
        img.pixels.foreach_get(px)
        bpy.data.images.remove(img)
        return px.reshape(h, w, c)[::-1]

    def _convert_passes(self, out_dir: str, v: int) -> None:
        """EXR passes of view ``v`` -> ``depth.VVV.png`` / ``normal.VVV.png`` (docs/design.md §3)."""
        from PIL import Image

        stem = os.path.join(out_dir, f"pass{v:03d}_")
        depth_exr, normal_exr = stem + "depth.exr", stem + "normal.exr"
        background = None
        if os.path.exists(depth_exr):
            z = self._read_exr(depth_exr)[..., 0]  # planar depth along the view axis
            background = z > 1e9  # Cycles writes 1e10 where no surface was hit
            mm = np.clip(np.round(z * 1000.0), 0, 65535).astype(np.uint16)
            mm[background] = 0
            Image.fromarray(mm).save(os.path.join(out_dir, view_member("depth", v)))
            os.remove(depth_exr)
        if os.path.exists(normal_exr):
            n = self._read_exr(normal_exr)[..., :3]  # world-space unit normals
            rgb = np.clip(np.round((n + 1.0) * 127.5), 0, 255).astype(np.uint8)
            if background is not None:
                rgb[background] = 0
            Image.fromarray(rgb).save(os.path.join(out_dir, view_member("normal", v)))
            os.remove(normal_exr)

    # --- per object -------------------------------------------------------------------
    def clear(self) -> None:
        """Remove every data block of the previous asset, keep camera/world/lights."""
        objs = [o for o in bpy.data.objects if o.name not in self.keep]
        bpy.data.batch_remove(objs)
        for coll in list(bpy.data.collections):
            bpy.data.collections.remove(coll)
        for datablocks in (
            bpy.data.meshes,
            bpy.data.materials,
            bpy.data.images,
            bpy.data.textures,
            bpy.data.actions,
            bpy.data.armatures,
            bpy.data.curves,
        ):
            bpy.data.batch_remove(list(datablocks))
        bpy.data.orphans_purge(do_local_ids=True, do_linked_ids=True, do_recursive=True)
        self.scene.frame_set(0)

    def load(self, path: str) -> None:
        ext = os.path.splitext(path)[1].lower()
        if ext not in IMPORTERS:
            raise AssetError(f"unsupported file type {ext!r}")
        if not os.path.isfile(path) or os.path.getsize(path) == 0:
            raise AssetError("file is missing or empty")
        try:
            result = IMPORTERS[ext](path)
        except Exception as e:  # importers raise RuntimeError with the add-on's traceback
            last = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            raise AssetError(f"import failed: {last[:300]}") from None
        if "FINISHED" not in result:
            raise AssetError(f"import failed: importer returned {sorted(result)}")
        # Imported objects may land in a fresh collection not linked to the scene.
        for obj in bpy.data.objects:
            if obj.name not in self.keep and not obj.users_scene:
                self.scene.collection.objects.link(obj)
            # Lights shipped with the asset would break the even lighting; hidden, not
            # deleted (deleting a parent would move its children).
            if obj.type == "LIGHT" and obj.name not in self.keep:
                obj.hide_render = True
        self._color_attribute_materials()
        # Frame 0 of animated assets: glTF time 0 is frame 0; the FBX importer shifts time 0 to
        # frame 1, and frame 0 then holds the first key (constant extrapolation).
        self.scene.frame_set(0)

    def _color_attribute_materials(self) -> None:
        """Meshes with a colour attribute but no material (PLY scans, vertex-painted OBJ/FBX)
        render with those colours instead of Blender's default grey."""
        for obj in self.scene.objects:
            if obj.type != "MESH" or not obj.data.color_attributes:
                continue
            if any(slot.material for slot in obj.material_slots):
                continue
            attrs = obj.data.color_attributes
            attr = attrs.active_color or attrs[0]
            mat = bpy.data.materials.new("mvdiff_color_attribute")  # 5.0: always node based
            nodes = mat.node_tree.nodes
            color = nodes.new("ShaderNodeVertexColor")
            color.layer_name = attr.name
            bsdf = nodes["Principled BSDF"]
            mat.node_tree.links.new(color.outputs["Color"], bsdf.inputs["Base Color"])
            obj.data.materials.clear()
            obj.data.materials.append(mat)

    def geometry_points(self) -> np.ndarray:
        """World-space points of every visible geometry object at the current frame, [N, 3]."""
        depsgraph = bpy.context.evaluated_depsgraph_get()
        chunks = []
        for obj in self.scene.objects:
            if obj.type not in GEOMETRY_TYPES or obj.hide_render:
                continue
            evaluated = obj.evaluated_get(depsgraph)
            try:
                mesh = evaluated.to_mesh()
            except RuntimeError:
                continue
            if mesh is None:
                continue
            n = len(mesh.vertices)
            if n:
                co = np.empty(n * 3, dtype=np.float64)
                mesh.vertices.foreach_get("co", co)
                co = co.reshape(n, 3)  # object space
                m = np.array(evaluated.matrix_world, dtype=np.float64)
                chunks.append(co @ m[:3, :3].T + m[:3, 3])  # object -> world, [n, 3]
            evaluated.to_mesh_clear()
        if not chunks:
            raise AssetError("empty scene: no geometry to render")
        return np.concatenate(chunks)

    def normalize(self) -> tuple[float, list[float]]:
        """Centre the bounding box at the origin and scale its longest side to 1.

        Returns ``(scale, offset)`` with ``p_normalised = scale * p_imported + offset``.
        """
        points = self.geometry_points()
        lo, hi = points.min(axis=0), points.max(axis=0)
        extent = float((hi - lo).max())
        if not np.isfinite(extent) or extent <= 0:
            raise AssetError(f"degenerate geometry (bounding box extent {extent})")
        scale = 1.0 / extent
        offset = -scale * (lo + hi) / 2
        root = bpy.data.objects.new("mvdiff_root", None)
        self.scene.collection.objects.link(root)
        for obj in list(self.scene.objects):
            if obj is not root and obj.parent is None and obj.name not in self.keep:
                world = obj.matrix_world.copy()
                obj.parent = root
                obj.matrix_parent_inverse = Matrix.Identity(4)  # root is identity here
                obj.matrix_world = world
        root.scale = (scale, scale, scale)
        root.location = tuple(offset)
        bpy.context.view_layer.update()
        return scale, [float(x) for x in offset]

    def render_views(self, c2w: list, fov_deg: list, out_dir: str) -> tuple[list, list, list, list]:
        """Render one RGBA PNG per camera to ``out_dir/rgba.VVV.png``.

        ``c2w``: V row-major 4x4 camera-to-world matrices (OpenGL frame, Blender's
        ``matrix_world``). Returns the matrices and fields of view Blender used (read back),
        and the CPU seconds (this process, all threads) and wall seconds of each view.
        """
        used_c2w, used_fov, cpu, wall = [], [], [], []
        for v, (m, fov) in enumerate(zip(c2w, fov_deg)):
            self.camera.data.angle = math.radians(fov)
            self.camera.matrix_world = Matrix(m)
            bpy.context.view_layer.update()
            used_c2w.append([list(row) for row in self.camera.matrix_world])
            used_fov.append(math.degrees(self.camera.data.angle))
            self.scene.render.filepath = os.path.join(out_dir, view_member("rgba", v))
            if self.passes is not None:
                self.passes.directory = out_dir
                self.passes.file_name = f"pass{v:03d}_"
            t0, w0 = time.process_time(), time.perf_counter()
            bpy.ops.render.render(write_still=True)
            if self.passes is not None:
                self._convert_passes(out_dir, v)
            cpu.append(time.process_time() - t0)
            wall.append(time.perf_counter() - w0)
        return used_c2w, used_fov, cpu, wall
