// compiled_unet_run: run a `.pt2` written by compiled_unet.save from C++, with no Python.
//
//   compiled_unet_run MODEL.pt2 INPUTS.safetensors OUTPUT.safetensors [--repeats N]
//   compiled_unet_run MODEL.pt2 --describe
//
// The package carries our artifact document (JSON) under the AOTInductor metadata key "compiled_unet": its
// "signature" lists every input leaf in the order the compiled graph takes them. Inputs are read from a
// safetensors file keyed by leaf name (the file `compiled-unet run --inputs` reads), checked against that
// signature (names, shapes, dtypes) BEFORE the model loads, and passed in signature order. The output
// (the UNet's `sample`) is written as a safetensors file under the key "sample". See README.md.
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>

#include <sys/stat.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <iostream>
#include <map>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "json.hpp"
#include "safetensors.hpp"

namespace {

const char* kMetaKey = "compiled_unet";
const char* kFormat = "compiled_unet.inductor-aot/1";
const char* kFreeuPrefix = "freeu_scales";  // runtime-supplied inputs: FreeU scales, defaults in doc["freeu"]

// A usage or input problem: exit status 2 and one line naming what is wrong.
struct UserError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct Leaf {
  std::string name;
  std::vector<int64_t> shape;
  std::string dtype;  // torch's name: float32, int64, ...
};

struct Artifact {
  std::vector<Leaf> inputs;     // tensor leaves, in the graph's input order
  std::vector<double> freeu;    // doc["freeu"] values, in graph input order
  std::string device = "cpu";
  std::string config_summary;
};

at::ScalarType scalar_type(const std::string& name) {
  static const std::map<std::string, at::ScalarType> table = {
      {"float32", at::kFloat}, {"float64", at::kDouble}, {"float16", at::kHalf}, {"bfloat16", at::kBFloat16},
      {"int64", at::kLong},    {"int32", at::kInt},      {"int16", at::kShort}, {"int8", at::kChar},
      {"uint8", at::kByte},    {"bool", at::kBool}};
  auto it = table.find(name);
  if (it == table.end()) throw UserError("the artifact's signature names an unknown dtype '" + name + "'");
  return it->second;
}

std::string torch_name(at::ScalarType t) {
  for (const char* n : {"float32", "float64", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool"})
    if (scalar_type(n) == t) return n;
  return c10::toString(t);
}

std::string shape_str(at::IntArrayRef s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}

std::string describe(const std::vector<Leaf>& leaves) {
  std::string out;
  for (const auto& l : leaves) out += (out.empty() ? "" : ", ") + l.name + ": " + shape_str(l.shape) + " " + l.dtype;
  return out;
}

// The artifact document, read from the package's metadata without loading its compiled code.
Artifact read_artifact(const std::string& path) {
  struct stat st;
  if (::stat(path.c_str(), &st) != 0) throw UserError(path + ": no such file (expected a .pt2 from compiled_unet.save)");
  std::unordered_map<std::string, std::string> meta;
  try {
    meta = torch::inductor::AOTIModelPackageLoader::load_metadata_from_package(path, "model");
  } catch (const std::exception& e) {
    std::string what = e.what();
    throw UserError(path + ": not an AOTInductor .pt2 package, or a damaged one (" + what.substr(0, what.find('\n')) + ")");
  }
  auto it = meta.find(kMetaKey);
  if (it == meta.end())
    throw UserError(path + ": an AOTInductor package, but not one written by compiled_unet.save (no '" +
                    std::string(kMetaKey) + "' metadata)");
  cu_json::Value doc;
  try {
    doc = cu_json::parse(it->second);
  } catch (const std::exception& e) {
    throw UserError(path + ": damaged '" + std::string(kMetaKey) + "' metadata (" + e.what() + ")");
  }
  const cu_json::Value* format = doc.get("format");
  if (!format || format->str != kFormat)
    throw UserError(path + ": unsupported artifact format '" + (format ? format->str : "") + "' (expected " + kFormat + ")");
  const cu_json::Value* sig = doc.get("signature");
  const cu_json::Value* leaves = sig ? sig->get("leaves") : nullptr;
  if (!leaves || leaves->kind != cu_json::Value::Array) throw UserError(path + ": damaged artifact (no input signature)");
  Artifact art;
  if (const cu_json::Value* dev = sig->get("device")) art.device = dev->str;
  for (const auto& x : leaves->items) {
    const cu_json::Value* shape = x.get("shape");
    if (!shape || shape->is_null()) continue;  // a constant leaf (e.g. return_dict): compiled into the graph
    Leaf leaf{x.get("name")->str, {}, x.get("dtype")->str};
    for (const auto& d : shape->items) leaf.shape.push_back(d.as_int());
    scalar_type(leaf.dtype);
    art.inputs.push_back(leaf);
  }
  if (const cu_json::Value* freeu = doc.get("freeu"); freeu && freeu->kind == cu_json::Value::Object)
    for (const auto& kv : freeu->fields) art.freeu.push_back(kv.second.num);
  if (const cu_json::Value* cfg = doc.get("config"); cfg && cfg->kind == cu_json::Value::Object) {
    for (const char* key : {"in_channels", "out_channels", "cross_attention_dim", "sample_size"})
      if (const cu_json::Value* v = cfg->get(key); v && v->kind == cu_json::Value::Number)
        art.config_summary += std::string(art.config_summary.empty() ? "" : ", ") + key + "=" + v->raw_number;
  }
  return art;
}

// The timestep as the Python runtime takes it (runtime/signature.py `_timestep`): one value broadcast to the
// compiled batch, any dtype converted to the compiled one, but never a fractional value truncated to int.
at::Tensor normalize_timestep(at::Tensor t, const Leaf& leaf) {
  at::ScalarType want = scalar_type(leaf.dtype);
  if (!at::isFloatingType(want) && at::isFloatingType(t.scalar_type()) && t.ne(t.trunc()).any().item<bool>())
    throw UserError("input 'timestep' is fractional but the graph takes an integer timestep (" + leaf.dtype + ")");
  if (t.sizes() != at::IntArrayRef(leaf.shape) && t.numel() == 1)
    t = t.reshape({}).expand(leaf.shape).clone(at::MemoryFormat::Contiguous);
  return t.to(want);
}

// The graph's inputs, in its order, from the file: every name known, every shape and dtype as compiled.
std::vector<at::Tensor> bind_inputs(const Artifact& art, const std::string& inputs_path) {
  cu_safetensors::Named file;
  try {
    file = cu_safetensors::read(inputs_path);
  } catch (const std::exception& e) {
    throw UserError(std::string("--inputs ") + e.what());
  }
  std::map<std::string, at::Tensor> given(file.begin(), file.end());
  std::vector<std::string> expected, missing, unknown;
  std::set<std::string> known;
  for (const auto& leaf : art.inputs) {
    known.insert(leaf.name);
    if (leaf.name.rfind(kFreeuPrefix, 0) == 0) continue;
    expected.push_back(leaf.name);
    if (!given.count(leaf.name)) missing.push_back(leaf.name);
  }
  for (const auto& kv : given)
    if (!known.count(kv.first)) unknown.push_back(kv.first);
  auto list = [](const std::vector<std::string>& v) {
    std::string s = "[";
    for (size_t i = 0; i < v.size(); ++i) s += (i ? ", " : "") + ("'" + v[i] + "'");
    return s + "]";
  };
  const std::string takes = "; the artifact takes " + describe(art.inputs);
  if (!missing.empty()) throw UserError("--inputs " + inputs_path + ": missing input(s) " + list(missing) + takes);
  if (!unknown.empty())
    throw UserError("--inputs " + inputs_path + ": input(s) " + list(unknown) + " are not inputs of this graph" + takes);

  const c10::Device device(art.device);
  std::vector<at::Tensor> flat;
  size_t freeu_index = 0;
  for (const auto& leaf : art.inputs) {
    at::Tensor t;
    if (leaf.name.rfind(kFreeuPrefix, 0) == 0 && !given.count(leaf.name)) {
      if (freeu_index >= art.freeu.size()) throw UserError("damaged artifact: FreeU input " + leaf.name + " has no scale");
      t = at::full(leaf.shape, art.freeu[freeu_index++], at::TensorOptions().dtype(scalar_type(leaf.dtype)));
    } else {
      t = given.at(leaf.name);
      if (leaf.name.rfind(kFreeuPrefix, 0) == 0) ++freeu_index;
      if (leaf.name == "timestep") t = normalize_timestep(t, leaf);
    }
    if (t.sizes() != at::IntArrayRef(leaf.shape) || torch_name(t.scalar_type()) != leaf.dtype)
      throw UserError("--inputs " + inputs_path + ": input '" + leaf.name + "' is " + shape_str(t.sizes()) + " " +
                      torch_name(t.scalar_type()) + "; expected " + shape_str(leaf.shape) + " " + leaf.dtype + takes);
    flat.push_back(t.to(device).contiguous());
  }
  return flat;
}

int usage(const char* prog) {
  std::cerr << "usage: " << prog << " MODEL.pt2 INPUTS.safetensors OUTPUT.safetensors [--repeats N]\n"
            << "       " << prog << " MODEL.pt2 --describe\n";
  return 2;
}

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> args(argv + 1, argv + argc);
  int repeats = 1;
  bool describe_only = false;
  std::vector<std::string> pos;
  for (size_t i = 0; i < args.size(); ++i) {
    if (args[i] == "--describe") describe_only = true;
    else if (args[i] == "--repeats" && i + 1 < args.size()) repeats = std::max(1, std::atoi(args[++i].c_str()));
    else if (args[i] == "-h" || args[i] == "--help") return usage(argv[0]), 0;
    else pos.push_back(args[i]);
  }
  if (describe_only ? pos.size() != 1 : pos.size() != 3) return usage(argv[0]);
  try {
    c10::InferenceMode guard;
    const Artifact art = read_artifact(pos[0]);
    if (describe_only) {
      std::cout << "device: " << art.device << "\nconfig: " << art.config_summary << "\ninputs (in order):\n";
      for (const auto& l : art.inputs) std::cout << "  " << l.name << ": " << shape_str(l.shape) << " " << l.dtype << "\n";
      return 0;
    }
    std::vector<at::Tensor> inputs = bind_inputs(art, pos[1]);  // checked before the model loads

    auto t0 = std::chrono::steady_clock::now();
    const c10::Device device(art.device);
    torch::inductor::AOTIModelPackageLoader loader(pos[0], "model", false, 1,
                                                  device.is_cpu() ? -1 : device.index());
    const double load_s = seconds_since(t0);
    std::vector<at::Tensor> out;
    std::vector<double> times;
    for (int r = 0; r < repeats; ++r) {
      t0 = std::chrono::steady_clock::now();
      out = loader.run(inputs);
      if (!device.is_cpu()) out[0].to(at::kCPU);  // wait for the device
      times.push_back(seconds_since(t0));
    }
    std::sort(times.begin(), times.end());
    cu_safetensors::Named named;
    for (size_t i = 0; i < out.size(); ++i) named.emplace_back(i ? "output_" + std::to_string(i) : "sample", out[i]);
    cu_safetensors::write(pos[2], named);
    std::printf("load %.3f s; run median %.2f ms over %d call(s); sample %s %s -> %s\n", load_s,
                times[times.size() / 2] * 1e3, repeats, shape_str(out[0].sizes()).c_str(),
                torch_name(out[0].scalar_type()).c_str(), pos[2].c_str());
    return 0;
  } catch (const UserError& e) {
    std::cerr << "compiled_unet_run: error: " << e.what() << "\n";
    return 2;
  } catch (const std::exception& e) {
    std::string what = e.what();
    std::cerr << "compiled_unet_run: failed: " << what.substr(0, what.find("\nException raised from")) << "\n";
    return 1;
  }
}
