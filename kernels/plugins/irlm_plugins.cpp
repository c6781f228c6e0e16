// TensorRT plugins for the irlm ONNX domain (lowering/onnx/custom_ops.py): one IPluginV3
// creator per custom node, registered under namespace "irlm", version "1", with the node's
// name ("PagedAttention") and attributes as plugin fields.  TensorRT's ONNX parser maps an
// irlm.PagedAttention node to this creator by op type.
//
// Built by kernels/CMakeLists.txt only where TensorRT's headers are found; it was not compiled
// where it was written (no TensorRT there).  enqueue() is one call of libirlm_kernels.so's
// irlm_paged_attention (capi/irlm_paged_attention.h: the launch logic of
// irlm.kernels.ops.paged_attention in C++, tested on a GPU through ctypes), and
// getWorkspaceSize() is that library's workspace query for the profile's largest shapes.
#include <NvInferRuntime.h>

#include "irlm_paged_attention.h"

#include <cuda_runtime_api.h>

#include <cstring>
#include <mutex>
#include <string>
#include <vector>

using namespace nvinfer1;

namespace {
constexpr char const* kNamespace = "irlm";
constexpr char const* kVersion = "1";
constexpr char const* kPagedAttention = "PagedAttention";

enum Input { kQuery, kKey, kValue, kCache, kTables, kQLens, kCachedLens, kNbInputs };
enum Output { kOut, kCacheOut, kNbOutputs };

struct PagedAttentionAttrs {
  int32_t layer = 0;
  float scale = 0.f;  // 0: 1/sqrt(head_dim)
  int32_t sliding_window = 0;
  std::vector<float> alibi_slopes;
  std::vector<float> kv_scales;
  // Not an ONNX attribute: the SM count the workspace was sized for (the building GPU's),
  // serialized with the engine so that the runtime sizes and splits the same way.
  int32_t sm_count = 0;
};

ILogger* gLogger = nullptr;

void logError(char const* msg) {
  if (gLogger != nullptr) gLogger->log(ILogger::Severity::kERROR, msg);
}

int32_t irlmDType(DataType t) {
  switch (t) {
    case DataType::kFLOAT: return IRLM_DTYPE_F32;
    case DataType::kHALF: return IRLM_DTYPE_F16;
    case DataType::kBF16: return IRLM_DTYPE_BF16;
    case DataType::kINT8: return IRLM_DTYPE_I8;
    case DataType::kFP8: return IRLM_DTYPE_F8E4M3;
    default: return -1;
  }
}

size_t elementSize(DataType t) {
  switch (t) {
    case DataType::kFLOAT: case DataType::kINT32: return 4;
    case DataType::kHALF: case DataType::kBF16: return 2;
    default: return 1;  // kINT8, kFP8
  }
}

// irlm_paged_attention's arguments from the node's attributes and its inputs' dims and types
// (pointers are set by enqueue).  Returns "" or why the shapes do not fit together.
std::string shapeArgs(PagedAttentionAttrs const& attrs, Dims const* dims, DataType const* types,
                      IrlmPagedAttentionArgs& a) {
  a = IrlmPagedAttentionArgs{};
  Dims const& q = dims[kQuery];
  Dims const& k = dims[kKey];
  Dims const& v = dims[kValue];
  Dims const& c = dims[kCache];
  Dims const& t = dims[kTables];
  if (q.nbDims != 3 || k.nbDims != 3 || v.nbDims != 3 || c.nbDims != 6 || t.nbDims != 2 ||
      dims[kQLens].nbDims != 1 || dims[kCachedLens].nbDims != 1)
    return "query/key/value must be rank 3, kv_cache rank 6, block_tables rank 2, q_lens and "
           "cached_lens rank 1";
  if (k.d[0] != q.d[0] || v.d[0] != q.d[0] || v.d[1] != k.d[1] || v.d[2] != k.d[2] ||
      k.d[2] != q.d[2])
    return "query, key and value token counts or head sizes differ";
  if (c.d[2] != 2 || c.d[4] != k.d[1] || c.d[5] != k.d[2])
    return "kv_cache must be [layers, blocks, 2, block_size, kv_heads, head_dim] with the "
           "keys' kv_heads and head_dim";
  if (dims[kQLens].d[0] != t.d[0] || dims[kCachedLens].d[0] != t.d[0])
    return "block_tables, q_lens and cached_lens request counts differ";
  a.num_tokens = static_cast<int>(q.d[0]);
  a.heads = static_cast<int>(q.d[1]);
  a.head_dim = static_cast<int>(q.d[2]);
  a.kv_heads = static_cast<int>(k.d[1]);
  a.layers = static_cast<int>(c.d[0]);
  a.num_blocks = static_cast<int>(c.d[1]);
  a.block_size = static_cast<int>(c.d[3]);
  a.num_reqs = static_cast<int>(t.d[0]);
  a.max_blocks = static_cast<int>(t.d[1]);
  a.layer = attrs.layer;
  a.dtype = irlmDType(types[kQuery]);
  a.cache_dtype = irlmDType(types[kCache]);
  a.sliding_window = attrs.sliding_window;
  a.scale = attrs.scale;  // 0: 1/sqrt(head_dim)
  if (!attrs.alibi_slopes.empty()) {
    a.alibi_slopes = attrs.alibi_slopes.data();  // host memory: the call copies them
    a.num_alibi_slopes = static_cast<int>(attrs.alibi_slopes.size());
  }
  if (attrs.kv_scales.size() == 2) {
    a.kv_scale_k = attrs.kv_scales[0];
    a.kv_scale_v = attrs.kv_scales[1];
  }
  a.decode = -1;  // the decode kernel when tokens == requests, as irlm's runtime
  a.num_sms = attrs.sm_count;
  return "";
}

class PagedAttentionPlugin : public IPluginV3,
                             public IPluginV3OneCore,
                             public IPluginV3OneBuildV2,
                             public IPluginV3OneRuntime {
 public:
  explicit PagedAttentionPlugin(PagedAttentionAttrs attrs) : mAttrs(std::move(attrs)) {
    buildFields();
  }

  // ---- IPluginV3 ----
  IPluginCapability* getCapabilityInterface(PluginCapabilityType type) noexcept override {
    switch (type) {
      case PluginCapabilityType::kCORE: return static_cast<IPluginV3OneCore*>(this);
      case PluginCapabilityType::kBUILD: return static_cast<IPluginV3OneBuildV2*>(this);
      case PluginCapabilityType::kRUNTIME: return static_cast<IPluginV3OneRuntime*>(this);
    }
    return nullptr;
  }
  IPluginV3* clone() noexcept override { return new PagedAttentionPlugin(mAttrs); }

  // ---- IPluginV3OneCore ----
  AsciiChar const* getPluginName() const noexcept override { return kPagedAttention; }
  AsciiChar const* getPluginVersion() const noexcept override { return kVersion; }
  AsciiChar const* getPluginNamespace() const noexcept override { return kNamespace; }

  // ---- IPluginV3OneBuild ----
  int32_t getNbOutputs() const noexcept override { return kNbOutputs; }

  int32_t getOutputDataTypes(DataType* out, int32_t nbOutputs, DataType const* in,
                             int32_t nbInputs) const noexcept override {
    if (nbInputs != kNbInputs || nbOutputs != kNbOutputs) return -1;
    out[kOut] = in[kQuery];
    out[kCacheOut] = in[kCache];
    return 0;
  }

  // output: [tokens, heads, value head_dim]; kv_cache_out: kv_cache's shape
  int32_t getOutputShapes(DimsExprs const* in, int32_t nbInputs, DimsExprs const*, int32_t,
                          DimsExprs* out, int32_t nbOutputs, IExprBuilder&) noexcept override {
    if (nbInputs != kNbInputs || nbOutputs != kNbOutputs) return -1;
    out[kOut].nbDims = 3;
    out[kOut].d[0] = in[kQuery].d[0];
    out[kOut].d[1] = in[kQuery].d[1];
    out[kOut].d[2] = in[kValue].d[2];
    out[kCacheOut] = in[kCache];
    return 0;
  }

  bool supportsFormatCombination(int32_t pos, DynamicPluginTensorDesc const* io,
                                 int32_t nbInputs, int32_t) noexcept override {
    PluginTensorDesc const& d = io[pos].desc;
    if (d.format != TensorFormat::kLINEAR) return false;
    bool isFloat = d.type == DataType::kFLOAT || d.type == DataType::kHALF ||
                   d.type == DataType::kBF16;
    if (pos == kQuery) return isFloat;
    if (pos == kKey || pos == kValue) return d.type == io[kQuery].desc.type;
    if (pos == kCache)
      return d.type == io[kQuery].desc.type || d.type == DataType::kINT8 ||
             d.type == DataType::kFP8;
    if (pos < nbInputs) return d.type == DataType::kINT32;  // block tables and lengths
    if (pos == nbInputs + kOut) return d.type == io[kQuery].desc.type;
    return d.type == io[kCache].desc.type;  // kv_cache_out
  }

  // Refuse at build time what enqueue cannot run (a head_dim without a kernel, a quantized
  // cache without scales, ...), with the library's reason, checked on the profile's largest
  // shapes.
  int32_t configurePlugin(DynamicPluginTensorDesc const* in, int32_t nbInputs,
                          DynamicPluginTensorDesc const*, int32_t nbOutputs) noexcept override {
    if (nbInputs != kNbInputs || nbOutputs != kNbOutputs) return -1;
    size_t bytes = 0;
    return workspaceFor(in, bytes) ? 0 : -1;
  }

  size_t getWorkspaceSize(DynamicPluginTensorDesc const* in, int32_t nbInputs,
                          DynamicPluginTensorDesc const*, int32_t) const noexcept override {
    size_t bytes = 0;
    if (nbInputs != kNbInputs || !workspaceFor(in, bytes)) return 0;  // enqueue then refuses
    return bytes;
  }

  // kv_cache_out is kv_cache updated in place
  int32_t getAliasedInput(int32_t outputIndex) noexcept override {
    return outputIndex == kCacheOut ? kCache : -1;
  }

  // ---- IPluginV3OneRuntime ----
  int32_t onShapeChange(PluginTensorDesc const*, int32_t, PluginTensorDesc const*,
                        int32_t) noexcept override {
    return 0;
  }

  // Write this step's keys and values into kv_cache (in place: kv_cache_out aliases it) and
  // attend.  No synchronisation: the call only launches kernels on `stream`.
  int32_t enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const*,
                  void const* const* inputs, void* const* outputs, void* workspace,
                  cudaStream_t stream) noexcept override {
    Dims dims[kNbInputs];
    DataType types[kNbInputs];
    for (int32_t i = 0; i < kNbInputs; ++i) {
      dims[i] = inputDesc[i].dims;
      types[i] = inputDesc[i].type;
    }
    IrlmPagedAttentionArgs a;
    std::string why = shapeArgs(mAttrs, dims, types, a);
    if (!why.empty()) {
      logError(("irlm.PagedAttention: " + why).c_str());
      return -1;
    }
    a.query = inputs[kQuery];
    a.key = inputs[kKey];
    a.value = inputs[kValue];
    // kv_cache_out is kv_cache in place (getAliasedInput); should a TensorRT give separate
    // buffers anyway, the output starts as a copy of the input
    if (outputs[kCacheOut] != inputs[kCache]) {
      size_t n = elementSize(types[kCache]);
      for (int32_t i = 0; i < dims[kCache].nbDims; ++i)
        n *= static_cast<size_t>(dims[kCache].d[i]);
      if (cudaMemcpyAsync(outputs[kCacheOut], inputs[kCache], n, cudaMemcpyDeviceToDevice,
                          stream) != cudaSuccess) {
        logError("irlm.PagedAttention: copying kv_cache to kv_cache_out failed");
        return -1;
      }
    }
    a.kv_cache = outputs[kCacheOut];
    a.block_tables = static_cast<int const*>(inputs[kTables]);
    a.q_lens = static_cast<int const*>(inputs[kQLens]);
    a.cached_lens = static_cast<int const*>(inputs[kCachedLens]);
    a.out = outputs[kOut];
    // TensorRT's workspace holds getWorkspaceSize's answer for the profile's largest shapes
    // (same SM count), which the library's query for these smaller shapes never exceeds
    size_t bytes = 0;
    if (irlm_paged_attention_workspace_size(&a, &bytes) != IRLM_PA_OK) {
      logError(irlm_paged_attention_error());
      return -1;
    }
    int rc = irlm_paged_attention(&a, workspace, bytes, stream);
    if (rc != IRLM_PA_OK) {
      logError(irlm_paged_attention_error());
      return -1;
    }
    return 0;
  }

  IPluginV3* attachToContext(IPluginResourceContext*) noexcept override { return clone(); }

  PluginFieldCollection const* getFieldsToSerialize() noexcept override {
    buildFields();
    return &mFieldCollection;
  }

 private:
  // irlm_paged_attention's workspace for the profile's largest shapes; false (logged) when
  // the library refuses the shapes or types.
  bool workspaceFor(DynamicPluginTensorDesc const* in, size_t& bytes) const {
    Dims dims[kNbInputs];
    DataType types[kNbInputs];
    for (int32_t i = 0; i < kNbInputs; ++i) {
      dims[i] = in[i].max;
      types[i] = in[i].desc.type;
    }
    IrlmPagedAttentionArgs a;
    std::string why = shapeArgs(mAttrs, dims, types, a);
    if (!why.empty()) {
      logError(("irlm.PagedAttention: " + why).c_str());
      return false;
    }
    if (irlm_paged_attention_workspace_size(&a, &bytes) != IRLM_PA_OK) {
      logError(irlm_paged_attention_error());
      return false;
    }
    return true;
  }

  void buildFields() {
    mFields.clear();
    mFields.emplace_back("layer", &mAttrs.layer, PluginFieldType::kINT32, 1);
    mFields.emplace_back("scale", &mAttrs.scale, PluginFieldType::kFLOAT32, 1);
    mFields.emplace_back("sliding_window", &mAttrs.sliding_window, PluginFieldType::kINT32, 1);
    mFields.emplace_back("alibi_slopes", mAttrs.alibi_slopes.data(), PluginFieldType::kFLOAT32,
                         static_cast<int32_t>(mAttrs.alibi_slopes.size()));
    mFields.emplace_back("kv_scales", mAttrs.kv_scales.data(), PluginFieldType::kFLOAT32,
                         static_cast<int32_t>(mAttrs.kv_scales.size()));
    mFields.emplace_back("sm_count", &mAttrs.sm_count, PluginFieldType::kINT32, 1);
    mFieldCollection.nbFields = static_cast<int32_t>(mFields.size());
    mFieldCollection.fields = mFields.data();
  }

  PagedAttentionAttrs mAttrs;
  std::vector<PluginField> mFields;
  PluginFieldCollection mFieldCollection{};
};

class PagedAttentionCreator : public IPluginCreatorV3One {
 public:
  PagedAttentionCreator() {
    mFields = {PluginField("layer", nullptr, PluginFieldType::kINT32, 1),
               PluginField("scale", nullptr, PluginFieldType::kFLOAT32, 1),
               PluginField("sliding_window", nullptr, PluginFieldType::kINT32, 1),
               PluginField("alibi_slopes", nullptr, PluginFieldType::kFLOAT32, 0),
               PluginField("kv_scales", nullptr, PluginFieldType::kFLOAT32, 0),
               PluginField("sm_count", nullptr, PluginFieldType::kINT32, 1)};
    mFieldCollection.nbFields = static_cast<int32_t>(mFields.size());
    mFieldCollection.fields = mFields.data();
  }
  AsciiChar const* getPluginName() const noexcept override { return kPagedAttention; }
  AsciiChar const* getPluginVersion() const noexcept override { return kVersion; }
  AsciiChar const* getPluginNamespace() const noexcept override { return kNamespace; }
  PluginFieldCollection const* getFieldNames() noexcept override { return &mFieldCollection; }

  // The ONNX parser passes each node attribute as a field of the same name (ints as INT32
  // here, floats as FLOAT32; a list attribute's length is the field's length).
  IPluginV3* createPlugin(AsciiChar const*, PluginFieldCollection const* fc,
                          TensorRTPhase) noexcept override {
    PagedAttentionAttrs a;
    bool haveLayer = false;
    for (int32_t i = 0; fc != nullptr && i < fc->nbFields; ++i) {
      PluginField const& f = fc->fields[i];
      auto asInt = [&]() {
        if (f.type == PluginFieldType::kINT64)
          return static_cast<int32_t>(*static_cast<int64_t const*>(f.data));
        return *static_cast<int32_t const*>(f.data);
      };
      auto floats = [&]() {
        std::vector<float> v(f.length);
        if (f.type == PluginFieldType::kFLOAT64) {
          auto const* d = static_cast<double const*>(f.data);
          for (int32_t k = 0; k < f.length; ++k) v[k] = static_cast<float>(d[k]);
        } else if (f.length > 0) {
          std::memcpy(v.data(), f.data, sizeof(float) * f.length);
        }
        return v;
      };
      if (!std::strcmp(f.name, "layer")) { a.layer = asInt(); haveLayer = true; }
      else if (!std::strcmp(f.name, "scale")) a.scale = floats().at(0);
      else if (!std::strcmp(f.name, "sliding_window")) a.sliding_window = asInt();
      else if (!std::strcmp(f.name, "alibi_slopes")) a.alibi_slopes = floats();
      else if (!std::strcmp(f.name, "kv_scales")) a.kv_scales = floats();
      else if (!std::strcmp(f.name, "sm_count")) a.sm_count = asInt();
      else {
        logError((std::string("irlm.PagedAttention: unknown field ") + f.name).c_str());
        return nullptr;
      }
    }
    if (!haveLayer) {
      logError("irlm.PagedAttention: the 'layer' attribute is required");
      return nullptr;
    }
    if (a.sm_count <= 0) {  // from the ONNX parser: size for the GPU building the engine
      int dev = 0;
      if (cudaGetDevice(&dev) != cudaSuccess ||
          cudaDeviceGetAttribute(&a.sm_count, cudaDevAttrMultiProcessorCount, dev) !=
              cudaSuccess) {
        logError("irlm.PagedAttention: cannot read the GPU's SM count");
        return nullptr;
      }
    }
    return new PagedAttentionPlugin(std::move(a));
  }

 private:
  std::vector<PluginField> mFields;
  PluginFieldCollection mFieldCollection{};
};

PagedAttentionCreator gPagedAttentionCreator;
}  // namespace

// The plugin-library interface TensorRT's IPluginRegistry::loadLibrary and trtexec's
// --staticPlugins / --dynamicPlugins read.
extern "C" void setLoggerFinder(ILoggerFinder* finder) {
  if (finder != nullptr) gLogger = finder->findLogger();
}

extern "C" IPluginCreatorInterface* const* getCreators(int32_t& nbCreators) {
  static IPluginCreatorInterface* const creators[] = {&gPagedAttentionCreator};
  nbCreators = 1;
  return creators;
}
