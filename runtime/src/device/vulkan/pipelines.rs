//! Shader modules, one compute pipeline per (module, entry point), layouts shared by binding
//! count, and one descriptor set per step, written once at load.

use std::collections::HashMap;

use ash::vk;

use super::memory::Owned;
use super::plan::{Plan, Region, StepPlan};
use super::vk_err;
use crate::error::RuntimeError;

/// A pipeline and the layout its steps' descriptor sets are made for.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Pipeline {
    pub pipeline: vk::Pipeline,
    pub layout: vk::PipelineLayout,
    pub set_layout: vk::DescriptorSetLayout,
}

/// Creates the modules, layouts and pipelines of `plan`, in `plan.pipelines` order.
pub(crate) fn pipelines(
    device: &ash::Device,
    owned: &mut Owned,
    plan: &Plan,
    required_subgroup_size: Option<u32>,
    label: &str,
) -> Result<Vec<Pipeline>, RuntimeError> {
    let mut modules = Vec::with_capacity(plan.modules.len());
    for words in &plan.modules {
        let info = vk::ShaderModuleCreateInfo::default().code(words);
        // SAFETY: `words` is a module whose header, instruction lengths, capabilities and entry
        // points `plan` checked; `info` lives across the call.
        let module = unsafe { device.create_shader_module(&info, None) }
            .map_err(|e| vk_err("vkCreateShaderModule", label, e))?;
        owned.shader_modules.push(module);
        modules.push(module);
    }
    let mut layouts: HashMap<usize, (vk::DescriptorSetLayout, vk::PipelineLayout)> = HashMap::new();
    let mut out = Vec::with_capacity(plan.pipelines.len());
    for key in &plan.pipelines {
        let (set_layout, layout) = match layouts.get(&key.bindings) {
            Some(&pair) => pair,
            None => {
                let bindings: Vec<vk::DescriptorSetLayoutBinding> = (0..key.bindings as u32)
                    .map(|b| {
                        vk::DescriptorSetLayoutBinding::default()
                            .binding(b)
                            .descriptor_type(vk::DescriptorType::STORAGE_BUFFER)
                            .descriptor_count(1)
                            .stage_flags(vk::ShaderStageFlags::COMPUTE)
                    })
                    .collect();
                let info = vk::DescriptorSetLayoutCreateInfo::default().bindings(&bindings);
                // SAFETY: a valid create info for a live device.
                let set_layout = unsafe { device.create_descriptor_set_layout(&info, None) }
                    .map_err(|e| vk_err("vkCreateDescriptorSetLayout", label, e))?;
                owned.set_layouts.push(set_layout);
                let sets = [set_layout];
                let info = vk::PipelineLayoutCreateInfo::default().set_layouts(&sets);
                // SAFETY: as above; the set layout is live.
                let layout = unsafe { device.create_pipeline_layout(&info, None) }
                    .map_err(|e| vk_err("vkCreatePipelineLayout", label, e))?;
                owned.pipeline_layouts.push(layout);
                layouts.insert(key.bindings, (set_layout, layout));
                (set_layout, layout)
            }
        };
        let mut subgroup = vk::PipelineShaderStageRequiredSubgroupSizeCreateInfo::default()
            .required_subgroup_size(required_subgroup_size.unwrap_or(0));
        let mut stage = vk::PipelineShaderStageCreateInfo::default()
            .stage(vk::ShaderStageFlags::COMPUTE)
            .module(modules[key.module])
            .name(&key.entry);
        if required_subgroup_size.is_some() {
            stage = stage.push_next(&mut subgroup);
        }
        let info = [vk::ComputePipelineCreateInfo::default().stage(stage).layout(layout)];
        // SAFETY: the module has this GLCompute entry point with the workgroup size the steps
        // launch (checked by `plan`); a required subgroup size was checked against the device
        // and its feature enabled.
        let created = unsafe { device.create_compute_pipelines(vk::PipelineCache::null(), &info, None) };
        let pipeline = match created {
            Ok(p) => p,
            Err((partial, e)) => {
                owned.pipelines.extend(partial.into_iter().filter(|p| *p != vk::Pipeline::null()));
                return Err(vk_err("vkCreateComputePipelines", label, e));
            }
        };
        let pipeline = pipeline
            .into_iter()
            .next()
            .ok_or_else(|| vk_err("vkCreateComputePipelines", label, vk::Result::ERROR_UNKNOWN))?;
        owned.pipelines.push(pipeline);
        out.push(Pipeline { pipeline, layout, set_layout });
    }
    Ok(out)
}

/// One descriptor set per step of an entry point, each binding written with its buffer, offset and range.
pub(crate) fn descriptor_sets(
    device: &ash::Device,
    owned: &mut Owned,
    steps: &[StepPlan],
    pipelines: &[Pipeline],
    buffers: impl Fn(Region) -> vk::Buffer,
    label: &str,
) -> Result<Vec<vk::DescriptorSet>, RuntimeError> {
    let total: usize = steps.iter().map(|s| s.bindings.len()).sum();
    // A pool size of 0 descriptors is invalid; a model of argument-less steps asks for one.
    let sizes = [vk::DescriptorPoolSize::default()
        .ty(vk::DescriptorType::STORAGE_BUFFER)
        .descriptor_count(total.max(1) as u32)];
    let info = vk::DescriptorPoolCreateInfo::default().max_sets(steps.len().max(1) as u32).pool_sizes(&sizes);
    // SAFETY: a valid create info for a live device.
    let pool = unsafe { device.create_descriptor_pool(&info, None) }
        .map_err(|e| vk_err("vkCreateDescriptorPool", label, e))?;
    owned.descriptor_pools.push(pool);
    if steps.is_empty() {
        return Ok(Vec::new());
    }
    let set_layouts: Vec<vk::DescriptorSetLayout> =
        steps.iter().map(|s| pipelines[s.pipeline].set_layout).collect();
    let info = vk::DescriptorSetAllocateInfo::default().descriptor_pool(pool).set_layouts(&set_layouts);
    // SAFETY: the pool has room for one set per step and every layout is live.
    let sets = unsafe { device.allocate_descriptor_sets(&info) }
        .map_err(|e| vk_err("vkAllocateDescriptorSets", label, e))?;
    let infos: Vec<Vec<vk::DescriptorBufferInfo>> = steps
        .iter()
        .map(|step| {
            step.bindings
                .iter()
                .map(|b| {
                    vk::DescriptorBufferInfo::default()
                        .buffer(buffers(b.region))
                        .offset(b.offset)
                        .range(b.range)
                })
                .collect()
        })
        .collect();
    let writes: Vec<vk::WriteDescriptorSet> = sets
        .iter()
        .zip(&infos)
        .flat_map(|(&set, infos)| {
            infos.iter().enumerate().map(move |(b, info)| {
                vk::WriteDescriptorSet::default()
                    .dst_set(set)
                    .dst_binding(b as u32)
                    .descriptor_type(vk::DescriptorType::STORAGE_BUFFER)
                    .buffer_info(std::slice::from_ref(info))
            })
        })
        .collect();
    // SAFETY: every set, buffer, offset and range is live and in bounds (`plan` placed each
    // range inside its buffer and within maxStorageBufferRange); no set is in use yet.
    unsafe { device.update_descriptor_sets(&writes, &[]) };
    Ok(sets)
}
