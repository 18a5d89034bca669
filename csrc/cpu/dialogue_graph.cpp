// CPU kernels that build dialogue graphs: the windowed GCNet/DialogueGCN edge set in one pass with
// no per-edge allocation, and the relational CSR (counting sort) the graph convolutions consume.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <string>
#include <vector>

namespace imer_fast {
namespace {

enum class RelationKind { kTemporal, kSpeaker, kDialogueGCN, kNone };

RelationKind parse_relations(const std::string& name) {
  if (name == "temporal") return RelationKind::kTemporal;
  if (name == "speaker") return RelationKind::kSpeaker;
  if (name == "dialoguegcn") return RelationKind::kDialogueGCN;
  if (name == "none") return RelationKind::kNone;
  TORCH_CHECK(false, "imer_fast::build_dialogue_graph: relations must be one of 'temporal', 'speaker', "
              "'dialoguegcn', 'none'; got '", name, "'");
}

// Sources of target i in a dialogue of length n: every j with i in [j - window_past, j + window_future]
// (GCNet's edge_perms; -1 means unbounded), i.e. j in [i - window_future, i + window_past].
inline int64_t first_source(int64_t i, int64_t window_future) {
  return window_future < 0 ? 0 : std::max<int64_t>(0, i - window_future);
}
inline int64_t last_source(int64_t i, int64_t n, int64_t window_past) {
  // Compared before adding so that huge windows (INT64_MAX) cannot overflow.
  return (window_past < 0 || window_past >= n - 1 - i) ? n - 1 : i + window_past;
}

// Canonical relation ids; imer_fast/ops/dialogue_graph.py documents them and maps release ids.
inline int64_t relation_of(RelationKind kind, int64_t src, int64_t tgt, int64_t spk_src, int64_t spk_tgt,
                           int64_t num_speakers) {
  switch (kind) {
    case RelationKind::kTemporal:
      return src < tgt ? 0 : (src == tgt ? 1 : 2);  // past, now, future (seen from the target)
    case RelationKind::kSpeaker:
      return spk_tgt * num_speakers + spk_src;  // GCNet's '{target speaker}{source speaker}'
    case RelationKind::kDialogueGCN:
      return (spk_src * num_speakers + spk_tgt) * 2 + (src < tgt ? 0 : 1);
    case RelationKind::kNone:
      return 0;
  }
  return 0;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> build_dialogue_graph_cpu(
    const at::Tensor& lengths, const at::Tensor& speakers, int64_t window_past, int64_t window_future,
    c10::string_view relations, int64_t num_speakers) {
  const char* op = "imer_fast::build_dialogue_graph: ";
  TORCH_CHECK(lengths.dim() == 1 && lengths.scalar_type() == at::kLong, op,
              "lengths must be a 1-D int64 tensor; got ", lengths.dim(), "-D ", lengths.scalar_type());
  TORCH_CHECK(speakers.dim() == 1 && speakers.scalar_type() == at::kLong, op,
              "speakers must be a packed 1-D int64 tensor; got ", speakers.dim(), "-D ", speakers.scalar_type());
  TORCH_CHECK(window_past >= -1 && window_future >= -1, op,
              "window_past and window_future must be >= -1 (-1: whole dialogue); got ", window_past, " and ",
              window_future);
  TORCH_CHECK(num_speakers >= 1, op, "num_speakers must be >= 1; got ", num_speakers);
  const RelationKind kind = parse_relations(std::string(relations));

  auto len = lengths.contiguous();
  auto spk = speakers.contiguous();
  const int64_t* len_p = len.data_ptr<int64_t>();
  const int64_t* spk_p = spk.data_ptr<int64_t>();
  const int64_t batch = len.numel();

  std::vector<int64_t> dialogue_start(batch + 1, 0);
  for (int64_t b = 0; b < batch; ++b) {
    TORCH_CHECK(len_p[b] >= 0, op, "lengths must be >= 0; got ", len_p[b], " at index ", b);
    dialogue_start[b + 1] = dialogue_start[b] + len_p[b];
  }
  const int64_t num_nodes = dialogue_start[batch];
  TORCH_CHECK(spk.numel() == num_nodes, op, "speakers must hold sum(lengths) = ", num_nodes,
              " entries; got ", spk.numel());
  for (int64_t i = 0; i < num_nodes; ++i) {
    TORCH_CHECK(spk_p[i] >= 0 && spk_p[i] < num_speakers, op, "speaker ids must lie in [0, num_speakers = ",
                num_speakers, "); got ", spk_p[i], " at node ", i);
  }

  // Degree of every target, then exclusive prefix sum: each target writes its own edge range.
  auto rowptr = at::empty({num_nodes + 1}, lengths.options());
  int64_t* rowptr_p = rowptr.data_ptr<int64_t>();
  rowptr_p[0] = 0;
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t n = len_p[b], base = dialogue_start[b];
    for (int64_t i = 0; i < n; ++i) {
      const int64_t degree = last_source(i, n, window_past) - first_source(i, window_future) + 1;
      rowptr_p[base + i + 1] = rowptr_p[base + i] + degree;
    }
  }
  const int64_t num_edges = rowptr_p[num_nodes];
  auto edge_index = at::empty({2, num_edges}, lengths.options());
  auto edge_type = at::empty({num_edges}, lengths.options());
  int64_t* src_p = edge_index.data_ptr<int64_t>();
  int64_t* tgt_p = src_p + num_edges;
  int64_t* type_p = edge_type.data_ptr<int64_t>();

  at::parallel_for(0, batch, 1, [&](int64_t b_begin, int64_t b_end) {
    for (int64_t b = b_begin; b < b_end; ++b) {
      const int64_t n = len_p[b], base = dialogue_start[b];
      for (int64_t i = 0; i < n; ++i) {
        int64_t e = rowptr_p[base + i];
        const int64_t hi = last_source(i, n, window_past);
        for (int64_t j = first_source(i, window_future); j <= hi; ++j, ++e) {
          src_p[e] = base + j;
          tgt_p[e] = base + i;
          type_p[e] = relation_of(kind, j, i, spk_p[base + j], spk_p[base + i], num_speakers);
        }
      }
    }
  });
  return {edge_index, edge_type, rowptr};
}

// Stable counting sort of edges by key[e] into buckets 0..num_keys-1; returns (ptr, order).
std::pair<at::Tensor, at::Tensor> counting_sort(const int64_t* key, int64_t num_edges, int64_t num_keys,
                                                const at::TensorOptions& options) {
  auto ptr = at::zeros({num_keys + 1}, options);
  auto order = at::empty({num_edges}, options);
  int64_t* ptr_p = ptr.data_ptr<int64_t>();
  int64_t* order_p = order.data_ptr<int64_t>();
  for (int64_t e = 0; e < num_edges; ++e) ptr_p[key[e] + 1]++;
  for (int64_t k = 0; k < num_keys; ++k) ptr_p[k + 1] += ptr_p[k];
  std::vector<int64_t> cursor(ptr_p, ptr_p + num_keys);
  for (int64_t e = 0; e < num_edges; ++e) order_p[cursor[key[e]]++] = e;
  return {ptr, order};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> relational_csr_cpu(
    const at::Tensor& edge_index, const at::Tensor& edge_type, int64_t num_nodes, int64_t num_relations) {
  const char* op = "imer_fast::relational_csr: ";
  TORCH_CHECK(edge_index.dim() == 2 && edge_index.size(0) == 2 && edge_index.scalar_type() == at::kLong, op,
              "edge_index must be an int64 tensor of shape [2, E]; got ", edge_index.scalar_type(), " of shape ",
              edge_index.sizes());
  const int64_t num_edges = edge_index.size(1);
  TORCH_CHECK(edge_type.dim() == 1 && edge_type.numel() == num_edges && edge_type.scalar_type() == at::kLong, op,
              "edge_type must be an int64 tensor of shape [E = ", num_edges, "]; got ", edge_type.scalar_type(),
              " of shape ", edge_type.sizes());
  TORCH_CHECK(num_nodes >= 0 && num_relations >= 1, op, "num_nodes must be >= 0 and num_relations >= 1; got ",
              num_nodes, " and ", num_relations);
  auto ei = edge_index.contiguous();
  auto et = edge_type.contiguous();
  const int64_t* src = ei.data_ptr<int64_t>();
  const int64_t* tgt = src + num_edges;
  const int64_t* type = et.data_ptr<int64_t>();
  std::vector<int64_t> key(num_edges), t_key(num_edges);
  for (int64_t e = 0; e < num_edges; ++e) {
    TORCH_CHECK(src[e] >= 0 && src[e] < num_nodes && tgt[e] >= 0 && tgt[e] < num_nodes, op,
                "edge_index entries must lie in [0, num_nodes = ", num_nodes, "); edge ", e, " is (", src[e], ", ",
                tgt[e], ")");
    TORCH_CHECK(type[e] >= 0 && type[e] < num_relations, op, "edge_type must lie in [0, num_relations = ",
                num_relations, "); edge ", e, " has type ", type[e]);
    key[e] = tgt[e] * num_relations + type[e];
    t_key[e] = src[e] * num_relations + type[e];
  }
  const auto options = edge_index.options().memory_format(c10::nullopt);
  auto [seg_ptr, perm] = counting_sort(key.data(), num_edges, num_nodes * num_relations, options);
  auto col = at::empty({num_edges}, options);
  std::vector<int64_t> sorted_t_key(num_edges);
  const int64_t* perm_p = perm.data_ptr<int64_t>();
  int64_t* col_p = col.data_ptr<int64_t>();
  for (int64_t k = 0; k < num_edges; ++k) {
    col_p[k] = src[perm_p[k]];
    sorted_t_key[k] = t_key[perm_p[k]];
  }
  // Transpose: bucket the forward-sorted edges by (source, relation); t_eid points back into them.
  auto [t_seg_ptr, t_eid] = counting_sort(sorted_t_key.data(), num_edges, num_nodes * num_relations, options);
  auto t_col = at::empty({num_edges}, options);
  const int64_t* t_eid_p = t_eid.data_ptr<int64_t>();
  int64_t* t_col_p = t_col.data_ptr<int64_t>();
  for (int64_t k = 0; k < num_edges; ++k) t_col_p[k] = tgt[perm_p[t_eid_p[k]]];
  return {seg_ptr, col, perm, t_seg_ptr, t_col, t_eid};
}

}  // namespace

TORCH_LIBRARY_IMPL(imer_fast, CPU, m) {
  m.impl("build_dialogue_graph", &build_dialogue_graph_cpu);
  m.impl("relational_csr", &relational_csr_cpu);
}

}  // namespace imer_fast
