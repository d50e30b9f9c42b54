/**
 * The consent question (CB2, CB7): the tenant's consent text as published, a link to its
 * privacy policy, and two buttons of equal weight. Accept and Decline look alike on purpose:
 * consent nudged by design is not freely given.
 *
 * Where the widget remembers visitors, a sentence of the widget's own below the tenant's text
 * says that a grant keeps the chat on this device, and for how long: the visitor consents to
 * that too, so it is said before the answer, not after.
 *
 * The dialog only asks; the caller records the answer (GiveConsent) and decides what follows.
 * Escape closes the panel, not the question: consent cannot be skipped by dismissing it, and
 * the dialog is still there when the visitor comes back.
 */

import type { Shell } from "./shell";
import { h, safeUrl, uid } from "./ui";

/** `rememberDays`: the visit lifetime when a grant keeps the visitor on this device, else null. */
export function askConsent(
  shell: Shell,
  text: string,
  privacyPolicyUrl: string,
  rememberDays: number | null,
): Promise<boolean> {
  const t = shell.t;
  const titleId = uid("consent-title");
  const textId = uid("consent-text");
  const rememberId = uid("consent-remember");
  const href = safeUrl(privacyPolicyUrl);
  return new Promise((resolve) => {
    const accept = h("button", { type: "button", "data-hafen": "consent-accept" }, t.accept);
    const decline = h("button", { type: "button", "data-hafen": "consent-decline" }, t.decline);
    const dialog = h(
      "div",
      {
        class: "modal",
        "data-hafen": "consent-dialog",
        "aria-describedby": rememberDays === null ? textId : `${textId} ${rememberId}`,
      },
      h("h3", { id: titleId }, t.consentTitle),
      h("div", { class: "consent-text", id: textId, lang: shell.textLang || null }, text),
      rememberDays !== null &&
        h("p", { id: rememberId, "data-hafen": "consent-remember" }, t.consentRemember(rememberDays)),
      href &&
        h(
          "p",
          null,
          h(
            "a",
            { href, target: "_blank", rel: "noopener noreferrer", "data-hafen": "privacy-link" },
            t.privacyPolicy,
          ),
        ),
      h("div", { class: "actions equal" }, decline, accept),
    );
    const modal = shell.modal(dialog, titleId, () => shell.close(), true);
    const answer = (granted: boolean) => {
      modal.close();
      resolve(granted);
    };
    accept.addEventListener("click", () => answer(true));
    decline.addEventListener("click", () => answer(false));
  });
}
