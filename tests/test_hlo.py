"""jaxeff.hlo reads collectives from compiled HLO text, in the forms jax 0.10 and 0.11 print."""

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxeff import hlo, sharding

LINES = {
  # jax 0.10.2's XLA: explicit groups and iota groups
  "explicit": "%ag = f32[8,4]{1,0} all-gather(f32[2,4]{1,0} %p), replica_groups={{0,2,4,6},{1,3,5,7}}, dimensions={0}",
  "iota": "%ar = (f32[16]{0}, bf16[8]{0}) all-reduce(%a, %b), channel_id=1, replica_groups=[2,4]<=[8], to_apply=%add",
  # jax 0.11.2's XLA: the mesh's axes by name
  "mesh": "%all_gather.7 = u32[4,2,13]{2,1,0} all-gather(%f), channel_id=1, "
  "replica_groups=mesh['data'=4,'fsdp'=2] {'data'}, dimensions={0}, use_global_device_ids=true",
  "mesh2": "%a2a = u32[1,20]{1,0} all-to-all(%x), replica_groups=mesh['data'=4,'fsdp'=2] {'data','fsdp'}",
  "mesh_ids": "%ag.1 = f32[8]{0} all-gather(%y), replica_groups=mesh['axis_0'=2,'axis_1'=4], "
  "device_ids=([4,2]T(1,0)) {'axis_0'}, dimensions={0}",
  "async": "%rs-start = ((f32[64]{0}), f32[16]{0}) reduce-scatter-start(%x), replica_groups={{0,1,2,3}}",
}


def test_every_replica_group_form_and_the_derived_operand_bytes():
  got = {name: hlo.collectives(line)[0] for name, line in LINES.items()}
  assert (got["explicit"].kind, got["explicit"].group_size) == ("all-gather", 4)
  assert got["explicit"].result_bytes == 128 and got["explicit"].operand_bytes == 32  # result / group
  assert (got["iota"].kind, got["iota"].group_size, got["iota"].result_bytes) == ("all-reduce", 4, 64 + 16)
  assert (got["mesh"].group_size, got["mesh"].operand_bytes) == (4, 4 * 2 * 13 * 4 // 4)
  assert got["mesh2"].group_size == 8 and got["mesh_ids"].group_size == 2
  assert got["async"].kind == "reduce-scatter-start" and got["async"].group_size == 4
  assert hlo.wire_bytes("all-reduce-start", 100, 4) == hlo.wire_bytes("all-reduce", 100, 4) == 150


def test_reads_this_jax_versions_compiled_programs():
  mesh = sharding.make_mesh({"data": 4, "tensor": 2})
  x = jax.device_put(jnp.ones((8, 16)), NamedSharding(mesh, P("data", "tensor")))
  with jax.set_mesh(mesh):
    text = jax.jit(lambda x: x.sum(0), out_shardings=NamedSharding(mesh, P())).lower(x).compile().as_text()
  found = hlo.collectives(text)
  assert found and all(c.group_size > 1 and c.result_bytes > 0 for c in found), [c.line for c in found]
