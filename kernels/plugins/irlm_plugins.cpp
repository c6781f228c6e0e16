// TensorRT plugins for the irlm ONNX domain (lowering/onnx/custom_ops.py): one IPluginV3
// creator per custom node, registered under namespace "irlm", version "1", with the node's
// name ("PagedAttention") and attributes as plugin fields.  TensorRT's ONNX parser maps an
// irlm.PagedAttention node to this creator by op type.
//
// Built by kernels/CMakeLists.txt only where TensorRT's headers are found; it was not compiled
// where it was written (no TensorRT there).  State: the build-time half (fields, output types
// and shapes, formats, the in-place KV-cache alias, serialization) is complete; enqueue() does
// not yet launch the kernels (the launch logic lives in kernels/src/ops.py) and fails with a
// logged error -- docs/lowering.md, "What does not lower".
#include <NvInferRuntime.h>

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
};

ILogger* gLogger = nullptr;

void logError(char const* msg) {
  if (gLogger != nullptr) gLogger->log(ILogger::Severity::kERROR, msg);
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

  int32_t configurePlugin(DynamicPluginTensorDesc const*, int32_t nbInputs,
                          DynamicPluginTensorDesc const*, int32_t nbOutputs) noexcept override {
    return nbInputs == kNbInputs && nbOutputs == kNbOutputs ? 0 : -1;
  }

  size_t getWorkspaceSize(DynamicPluginTensorDesc const*, int32_t, DynamicPluginTensorDesc const*,
                          int32_t) const noexcept override {
    return 0;
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

  int32_t enqueue(PluginTensorDesc const*, PluginTensorDesc const*, void const* const*,
                  void* const*, void*, cudaStream_t) noexcept override {
    logError("irlm.PagedAttention: enqueue is not implemented yet (the kernels are in "
             "libirlm_kernels.so; the launch logic is kernels/src/ops.py's)");
    return -1;
  }

  IPluginV3* attachToContext(IPluginResourceContext*) noexcept override { return clone(); }

  PluginFieldCollection const* getFieldsToSerialize() noexcept override {
    buildFields();
    return &mFieldCollection;
  }

 private:
  void buildFields() {
    mFields.clear();
    mFields.emplace_back("layer", &mAttrs.layer, PluginFieldType::kINT32, 1);
    mFields.emplace_back("scale", &mAttrs.scale, PluginFieldType::kFLOAT32, 1);
    mFields.emplace_back("sliding_window", &mAttrs.sliding_window, PluginFieldType::kINT32, 1);
    mFields.emplace_back("alibi_slopes", mAttrs.alibi_slopes.data(), PluginFieldType::kFLOAT32,
                         static_cast<int32_t>(mAttrs.alibi_slopes.size()));
    mFields.emplace_back("kv_scales", mAttrs.kv_scales.data(), PluginFieldType::kFLOAT32,
                         static_cast<int32_t>(mAttrs.kv_scales.size()));
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
               PluginField("kv_scales", nullptr, PluginFieldType::kFLOAT32, 0)};
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
      else {
        logError((std::string("irlm.PagedAttention: unknown field ") + f.name).c_str());
        return nullptr;
      }
    }
    if (!haveLayer) {
      logError("irlm.PagedAttention: the 'layer' attribute is required");
      return nullptr;
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
