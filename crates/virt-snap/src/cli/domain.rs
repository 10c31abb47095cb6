//! `virt-snap define | undefine | start | dumpxml | attach | destroy | shutdown | list |
//! domstate | domblklist | qemu-monitor-command | qemu-agent-command`: domains (virsh's names
//! and output).

use super::output::{self, Format};
use super::render::virsh::table;
use super::{CliError, CliResult};
use clap::Subcommand;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Domain commands.
#[derive(Debug, Subcommand)]
pub enum DomainCmd {
    /// Define a domain from libvirt domain XML (or replace its definition).
    Define {
        /// The domain XML file.
        file: PathBuf,
    },
    /// Forget a domain's definition (refused while it runs).
    Undefine {
        /// The domain.
        domain: String,
    },
    /// Start a defined domain.
    Start {
        /// The domain.
        domain: String,
        /// Start with the vCPUs paused.
        #[arg(long)]
        paused: bool,
    },
    /// Print a domain's definition as libvirt domain XML.
    Dumpxml {
        /// The domain.
        domain: String,
    },
    /// Adopt a QEMU that another tool started, by its QMP socket: its disks get leases, so
    /// volume operations are refused while it runs.
    Attach {
        /// The name to know the domain by.
        domain: String,
        /// The QEMU's QMP socket.
        #[arg(long, value_name = "SOCKET")]
        qmp: PathBuf,
        /// The guest agent's socket (for qemu-agent-command).
        #[arg(long, value_name = "SOCKET")]
        agent: Option<PathBuf>,
    },
    /// Stop a domain now (QMP quit, then SIGKILL).
    Destroy {
        /// The domain.
        domain: String,
    },
    /// Pause a running domain's vCPUs.
    Suspend {
        /// The domain.
        domain: String,
    },
    /// Resume a paused domain (also ends the pause for a snapshot's manual disks).
    Resume {
        /// The domain.
        domain: String,
    },
    /// Ask the guest to power off (ACPI) and wait for it.
    Shutdown {
        /// The domain.
        domain: String,
        /// Seconds to wait for the guest to power off.
        #[arg(long, value_name = "SECS", default_value_t = 60)]
        timeout: u64,
    },
    /// List the running domains (with --all, the defined ones and those that ran here too).
    List {
        /// Also domains that are not running.
        #[arg(long)]
        all: bool,
    },
    /// The state of a domain.
    Domstate {
        /// The domain.
        domain: String,
        /// Also say why.
        #[arg(long)]
        reason: bool,
    },
    /// The disks of a running domain.
    Domblklist {
        /// The domain.
        domain: String,
    },
    /// Run a QMP command on the domain's QEMU and print the reply.
    QemuMonitorCommand {
        /// The domain.
        domain: String,
        /// The command: {"execute": NAME, "arguments": {...}}.
        json: String,
    },
    /// Run a guest agent command and print the reply.
    QemuAgentCommand {
        /// The domain.
        domain: String,
        /// The command: {"execute": NAME, "arguments": {...}}.
        json: String,
        /// Seconds to wait for the agent.
        #[arg(long, value_name = "SECS", default_value_t = 10)]
        timeout: u64,
    },
}

fn out_err(e: std::io::Error) -> CliError {
    CliError::with_source("cannot write output", e)
}

fn print_reply(out: Format, v: &serde_json::Value) -> CliResult {
    match out {
        Format::Json => output::print_json(v).map_err(out_err),
        Format::Text => {
            println!("{v}");
            Ok(())
        }
    }
}

/// What suspend and resume print: the state after, or `Domain 'D' <done>`.
fn print_state(
    out: Format,
    domain: &str,
    st: virt_snap::domain::StateInfo,
    done: &str,
) -> CliResult {
    match out {
        Format::Json => output::print_json(&serde_json::json!({
            "name": domain, "state": st.state, "reason": st.reason,
        }))
        .map_err(out_err),
        Format::Text => {
            println!("Domain '{domain}' {done}");
            Ok(())
        }
    }
}

/// Run a domain command.
pub async fn run(cmd: DomainCmd, out: Format, state: Option<&Path>) -> CliResult {
    let conn = super::connect(state)?;
    match cmd {
        DomainCmd::Define { file } => {
            let xml = std::fs::read_to_string(&file)
                .map_err(|e| CliError::with_source(format!("cannot read {}", file.display()), e))?;
            let def = conn.define(&xml).await?;
            match out {
                Format::Json => output::print_json(&serde_json::json!({
                    "name": def.name, "uuid": def.uuid, "file": file,
                }))
                .map_err(out_err),
                Format::Text => {
                    println!("Domain '{}' defined from {}", def.name, file.display());
                    Ok(())
                }
            }
        }
        DomainCmd::Undefine { domain } => {
            let def = conn.undefine(&domain).await?;
            match out {
                Format::Json => output::print_json(&serde_json::json!({
                    "name": def.name, "uuid": def.uuid,
                }))
                .map_err(out_err),
                Format::Text => {
                    println!("Domain '{domain}' has been undefined");
                    Ok(())
                }
            }
        }
        DomainCmd::Start { domain, paused } => {
            let dom = conn.start_defined(&domain, paused).await?;
            let pid = dom.pid()?;
            match out {
                Format::Json => output::print_json(&serde_json::json!({
                    "name": domain, "pid": pid,
                    "state": if paused { "paused" } else { "running" },
                }))
                .map_err(out_err),
                Format::Text => {
                    println!("Domain '{domain}' started");
                    Ok(())
                }
            }
        }
        DomainCmd::Dumpxml { domain } => {
            let xml = conn.dumpxml(&domain)?;
            match out {
                Format::Json => output::print_json(&serde_json::json!({
                    "name": domain, "xml": xml,
                }))
                .map_err(out_err),
                Format::Text => {
                    print!("{xml}");
                    if !xml.ends_with('\n') {
                        println!();
                    }
                    Ok(())
                }
            }
        }
        DomainCmd::Attach { domain, qmp, agent } => {
            let dom = conn.attach(&domain, &qmp, agent.as_deref()).await?;
            let pid = dom.pid()?;
            match out {
                Format::Json => output::print_json(&serde_json::json!({
                    "name": domain, "pid": pid, "qmp": qmp, "agent": agent,
                }))
                .map_err(out_err),
                Format::Text => {
                    match pid {
                        Some(p) => println!("Domain '{domain}' attached (pid {p})"),
                        None => println!("Domain '{domain}' attached"),
                    }
                    Ok(())
                }
            }
        }
        DomainCmd::Destroy { domain } => {
            let dom = conn.domain(&domain)?;
            dom.destroy().await?;
            let st = dom.state().await?;
            match out {
                Format::Json => output::print_json(&serde_json::json!({
                    "name": domain, "state": st.state, "reason": st.reason,
                }))
                .map_err(out_err),
                Format::Text => {
                    println!("Domain '{domain}' destroyed");
                    Ok(())
                }
            }
        }
        DomainCmd::Suspend { domain } => {
            let dom = conn.domain(&domain)?;
            dom.suspend().await?;
            print_state(out, &domain, dom.state().await?, "suspended")
        }
        DomainCmd::Resume { domain } => {
            let dom = conn.domain(&domain)?;
            dom.resume().await?;
            print_state(out, &domain, dom.state().await?, "resumed")
        }
        DomainCmd::Shutdown { domain, timeout } => {
            let st = conn
                .domain(&domain)?
                .shutdown(Duration::from_secs(timeout))
                .await?;
            match out {
                Format::Json => output::print_json(&serde_json::json!({
                    "name": domain, "state": st.state, "reason": st.reason,
                }))
                .map_err(out_err),
                Format::Text => {
                    if st.state == virt_snap::domain::DomainState::ShutOff {
                        println!("Domain '{domain}' has been shut down");
                    } else {
                        println!(
                            "Domain '{domain}' is being shutdown (still {} after {timeout} s)",
                            st.state
                        );
                    }
                    Ok(())
                }
            }
        }
        DomainCmd::List { all } => {
            let list = conn.domains(all).await?;
            match out {
                Format::Json => output::print_json(&list).map_err(out_err),
                Format::Text => {
                    let rows: Vec<Vec<String>> = list
                        .iter()
                        .map(|d| {
                            vec![
                                d.id.map_or_else(|| "-".to_string(), |i| i.to_string()),
                                d.name.clone(),
                                d.state.to_string(),
                            ]
                        })
                        .collect();
                    print!("{}", table(&["Id", "Name", "State"], &rows));
                    println!();
                    Ok(())
                }
            }
        }
        DomainCmd::Domstate { domain, reason } => {
            let st = conn.domain(&domain)?.state().await?;
            match out {
                Format::Json => output::print_json(&st).map_err(out_err),
                Format::Text => {
                    if reason {
                        println!("{} ({})", st.state, st.reason);
                    } else {
                        println!("{}", st.state);
                    }
                    println!();
                    Ok(())
                }
            }
        }
        DomainCmd::Domblklist { domain } => {
            let disks = conn.domain(&domain)?.block_devices().await?;
            match out {
                Format::Json => output::print_json(&disks).map_err(out_err),
                Format::Text => {
                    let rows: Vec<Vec<String>> = disks
                        .iter()
                        .map(|d| vec![d.target.clone(), d.source.clone()])
                        .collect();
                    print!("{}", table(&["Target", "Source"], &rows));
                    println!();
                    Ok(())
                }
            }
        }
        DomainCmd::QemuMonitorCommand { domain, json } => {
            let r = conn.domain(&domain)?.monitor_command(&json).await?;
            print_reply(out, &r)
        }
        DomainCmd::QemuAgentCommand {
            domain,
            json,
            timeout,
        } => {
            let r = conn
                .domain(&domain)?
                .agent_command(&json, Duration::from_secs(timeout))
                .await?;
            print_reply(out, &r)
        }
    }
}
